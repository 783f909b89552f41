"""Numbers every peer of the swarm agrees on. Changing one changes the protocol version."""

# 2: checkpoint and router records name two blobs, the training state and the inference export
# 3: provider records carry the whole blob reference and are filed under its digest (`BlobRef.ref_id`)
# 4: a blob's id is the root of its size and chunk digest list (`protocol.hashing.blob_root`), not its file sha256
PROTOCOL_VERSION = 4

# Blobs move in fixed-size chunks; each chunk's sha256 is part of the signed blob reference, so a
# downloader can verify (and blame a provider for) every chunk on its own and resume per chunk.
CHUNK_BYTES = 4 * 1024 * 1024
MAX_BLOB_BYTES = 64 * 1024**3
MAX_CHUNKS = -(-MAX_BLOB_BYTES // CHUNK_BYTES)

# DHT values stay tiny: blobs never go into the DHT (hivemind drops values over ~4 MiB anyway).
MAX_RECORD_BYTES = 4096
# A checkpoint or router key holds at most this many live entries (signers) on an honest peer:
# 512 x 4 KiB stays far below hivemind's ~4 MiB message limit, past which a read returns nothing.
MAX_SUBKEYS_PER_KEY = 512
MAX_STRING_CHARS = 256
MAX_MADDRS = 8

# How far ahead of now a record of each kind may ask to live (no squatting far in the future).
MAX_EXPIRATION_AHEAD_S = {
    "claim": 15 * 60,
    "peer": 15 * 60,
    "provider": 2 * 3600,
    "checkpoint": 7 * 24 * 3600,
    "router": 7 * 24 * 3600,
    "beacon": 24 * 3600,
    "audit": 7 * 24 * 3600,  # as long as the checkpoint it measures
    # the operator renews a revocation (`ddm-swarm revoke` again) within this; peers that saw one
    # keep refusing its target for as long as they run
    "revocation": 30 * 24 * 3600,
}

# Clocks of honest peers disagree by this much at most; records from further in the future are refused.
CLOCK_SKEW_S = 60.0

# Blob transfer (protocol/blob_wire.py). A request and a response header are each a small
# length-prefixed canonical msgpack map; a range answer carries at most MAX_RANGE_BYTES, so a peer
# never has to buffer more than that for one request.
MAX_BLOB_REQUEST_BYTES = 256
MAX_BLOB_RESPONSE_HEADER_BYTES = 512
MAX_RANGE_BYTES = 4 * CHUNK_BYTES

# No record may claim more steps than this: 2^40 (a trillion) is beyond any training run, far below
# int64, so a step read from a record can always be counted on (step + 1, samples = step * batch)
# without overflowing a record field, a tensor or the trainer. Checkpoint headers share the bound
# (ddm_models.checkpoint.MAX_STEP).
MAX_STEP = 2**40
