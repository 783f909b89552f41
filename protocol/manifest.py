"""The swarm manifest: what a swarm trains, on which data, with which models, trusting whom.

The swarm id is the sha256 of the manifest's canonical msgpack encoding, so two peers share DHT
keys only if they agree on every field. `SwarmManifest.from_dict` validates a plain dict (as
loaded from YAML by the node) and fills defaults; errors name the offending field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from protocol.encoding import canonical_encode
from protocol.errors import InvalidManifest, SwarmVersionMismatch
from protocol.hashing import sha256_hex
from protocol.identity import is_signer_id
from protocol.jobs import Job, swarm_jobs
from protocol.limits import PROTOCOL_VERSION
from protocol.manifest_data import DATASET_KINDS, DatasetSpec, check_clusters, parse_dataset  # noqa: F401 (re-exported)
from protocol.manifest_fields import ManifestFields as _Fields
from protocol.manifest_fields import positive as _positive

_SCALARS = (str, int, float, bool)


def _plain(value: Any, name: str, depth: int = 0) -> Any:
    """Model architecture/training maps: scalars, lists of scalars and maps of them, nothing else."""
    if isinstance(value, _SCALARS):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidManifest(f"manifest field '{name}' must be finite")
        return value
    if isinstance(value, (list, tuple)) and depth < 3:
        return [_plain(item, name, depth + 1) for item in value]
    if isinstance(value, Mapping) and depth < 3 and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{name}.{k}", depth + 1) for k, v in value.items()}
    raise InvalidManifest(f"manifest field '{name}' holds an unsupported value {value!r:.60}")


@dataclass(frozen=True)
class VaeSpec:
    """The image autoencoder experts and the router work through (latent diffusion), e.g. a
    diffusers `AutoencoderKL` such as "stabilityai/sd-vae-ft-mse": a Hugging Face model id (looked up
    in the local cache only) or a local folder. `scaling_factor` multiplies the latents to unit
    variance; None takes the VAE's own config value. A manifest without one trains in pixel space."""

    model: str
    scaling_factor: Optional[float] = None


@dataclass(frozen=True)
class ClusteringSpec:
    num_clusters: int
    method: str = "kmeans-2stage"
    embedding: str = "pixel-pca"
    fine_clusters: int = 64
    seed: int = 0
    assignment_sha256: str = ""  # when set, every peer checks its locally built split against it


@dataclass(frozen=True)
class ModelSpec:
    """A model configuration the swarm accepts. `spec_hash` identifies compatible weights."""

    name: str
    objective: str  # fm | ddpm for experts, router for the router
    architecture: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str:
        return sha256_hex(canonical_encode({"name": self.name, "objective": self.objective,
                                            "architecture": self.architecture}))


@dataclass(frozen=True)
class TrustPolicy:
    mode: str = "open"  # open: any signer; allowlist: only `signers`
    signers: Tuple[str, ...] = ()
    # the operator's signer id: the one key whose revocations every peer applies ("" = nobody)
    operator: str = ""

    def allows(self, signer_id: str) -> bool:
        return self.mode == "open" or signer_id in self.signers or (bool(self.operator) and signer_id == self.operator)

    def to_dict(self) -> dict:
        # `operator` only when set: a manifest without one keeps the swarm id it always had
        return {"mode": self.mode, "signers": list(self.signers), **({"operator": self.operator} if self.operator else {})}


@dataclass(frozen=True)
class Timing:
    lease_s: float = 20.0  # T: claims are renewed every T and expire after 3T
    checkpoint_every_steps: int = 200
    record_ttl_s: float = 3600.0  # how long checkpoint and provider records live before renewal

    @property
    def lease_expiry_s(self) -> float:
        return 3 * self.lease_s


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 20
    guidance: float = 2.0
    routing: str = "top2"


@dataclass(frozen=True)
class SwarmManifest:
    name: str
    dataset: DatasetSpec
    clustering: ClusteringSpec
    experts: Tuple[ModelSpec, ...]
    router: ModelSpec
    default_expert: str
    protocol_version: int = PROTOCOL_VERSION
    description: str = ""
    text_encoder: str = "minilm"
    cluster_experts: Tuple[Tuple[int, str], ...] = ()  # per-cluster default model, else default_expert
    trust: TrustPolicy = TrustPolicy()
    timing: Timing = Timing()
    sampling: SamplingDefaults = SamplingDefaults()
    vae: Optional[VaeSpec] = None  # None: experts see pixels
    # Where to join. Not part of the swarm id: moving a bootstrap peer must not fork the swarm.
    bootstrap_peers: Tuple[str, ...] = ()

    # --- identity --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        # `vae` appears only when set, so every pixel-space manifest keeps the swarm id it had before
        # the field existed.
        latent = {} if self.vae is None else {"vae": {"model": self.vae.model, **(
            {} if self.vae.scaling_factor is None else {"scaling_factor": self.vae.scaling_factor})}}
        return {
            **latent,
            "name": self.name, "protocol_version": self.protocol_version, "description": self.description,
            "dataset": self.dataset.to_dict(),
            "clustering": dict(vars(self.clustering)), "text_encoder": self.text_encoder,
            "experts": [dict(vars(spec)) for spec in self.experts], "router": dict(vars(self.router)),
            "default_expert": self.default_expert,
            "cluster_experts": {str(k): v for k, v in self.cluster_experts},
            "trust": self.trust.to_dict(),
            "timing": dict(vars(self.timing)), "sampling": dict(vars(self.sampling)),
        }

    def to_file_dict(self) -> dict:
        """`to_dict()` plus the fields that are not part of the swarm id (for manifest files)."""
        return {**self.to_dict(), "bootstrap_peers": list(self.bootstrap_peers)}

    def canonical_bytes(self) -> bytes:
        return canonical_encode(self.to_dict())

    @property
    def swarm_id(self) -> str:
        return sha256_hex(self.canonical_bytes())

    # --- lookups ---------------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return self.clustering.num_clusters

    @property
    def jobs(self) -> List[Job]:
        """Every job of the swarm: one expert per cluster, then the router."""
        return swarm_jobs(self.num_clusters)

    def model_for(self, job: Job, expert: Optional[str] = None) -> ModelSpec:
        """The spec a node trains for `job`: the router's, the expert model named `expert`, or the cluster's default."""
        if job.is_router:
            return self.router
        return self.expert_spec(expert) if expert else self.expert_for_cluster(job.cluster)

    def expert_spec(self, name: str) -> ModelSpec:
        for spec in self.experts:
            if spec.name == name:
                return spec
        raise InvalidManifest(f"swarm '{self.name}' has no expert model '{name}'; "
                              f"it allows {[s.name for s in self.experts]}")

    def expert_for_cluster(self, cluster: int) -> ModelSpec:
        return self.expert_spec(dict(self.cluster_experts).get(cluster, self.default_expert))

    def spec_by_hash(self, spec_hash: str) -> Optional[ModelSpec]:
        for spec in (*self.experts, self.router):
            if spec.spec_hash == spec_hash:
                return spec
        return None

    # --- parsing ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> "SwarmManifest":
        top = _Fields(data, "")
        name = top.get("name", str)
        if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
            raise InvalidManifest("manifest field 'name' must be 1-64 characters of letters, digits, '.', '_', '-'")
        version = top.get("protocol_version", int, PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise SwarmVersionMismatch(f"manifest '{name}' is for protocol version {version}, "
                                       f"this ddm-swarm speaks version {PROTOCOL_VERSION}")
        manifest = cls(
            name=name, protocol_version=version, description=top.get("description", str, ""),
            dataset=parse_dataset(top.sub("dataset")), clustering=_clustering(top.sub("clustering")),
            text_encoder=top.get("text_encoder", str, "minilm"),
            experts=tuple(_model(item, f"experts[{i}]") for i, item in enumerate(top.get("experts", list))),
            router=_model(top.get("router", Mapping), "router"),
            default_expert=top.get("default_expert", str, ""),
            cluster_experts=_cluster_experts(top.get("cluster_experts", Mapping, {})),
            trust=_trust(top.sub("trust", {})), timing=_timing(top.sub("timing", {})),
            sampling=_sampling(top.sub("sampling", {})),
            vae=_vae(top.get("vae", Mapping, None)),
            bootstrap_peers=tuple(_strings(top.get("bootstrap_peers", list, []), "bootstrap_peers")),
        )
        top.done()
        return manifest._checked()

    def _checked(self) -> "SwarmManifest":
        if not self.experts:
            raise InvalidManifest("manifest field 'experts' must list at least one model")
        names = [spec.name for spec in self.experts]
        if len(set(names)) != len(names):
            raise InvalidManifest(f"manifest field 'experts' has duplicate names: {names}")
        if any(spec.objective not in ("fm", "ddpm") for spec in self.experts):
            raise InvalidManifest("manifest field 'experts[].objective' must be 'fm' or 'ddpm'")
        if self.router.objective != "router":
            raise InvalidManifest("manifest field 'router.objective' must be 'router'")
        if not self.default_expert:
            object.__setattr__(self, "default_expert", names[0])
        self.expert_spec(self.default_expert)
        check_clusters(self.dataset, self.num_clusters)
        for cluster, model in self.cluster_experts:
            if not 0 <= cluster < self.num_clusters:
                raise InvalidManifest(f"manifest field 'cluster_experts' names cluster {cluster}, "
                                      f"but the swarm has clusters 0..{self.num_clusters - 1}")
            self.expert_spec(model)
        return self


def _strings(values: list, name: str) -> list:
    if not all(isinstance(v, str) and v for v in values):
        raise InvalidManifest(f"manifest field '{name}' must be a list of non-empty strings")
    return values


def _vae(data: Optional[Mapping]) -> Optional[VaeSpec]:
    if data is None:
        return None
    fields = _Fields(data, "vae")
    spec = VaeSpec(model=fields.get("model", str), scaling_factor=fields.get("scaling_factor", float, None))
    fields.done()
    if not spec.model or len(spec.model) > 256 or any(c.isspace() or not c.isprintable() for c in spec.model):
        raise InvalidManifest("manifest field 'vae.model' must be a Hugging Face model id or a folder path "
                              "(1-256 printable characters, no spaces)")
    if spec.scaling_factor is not None:
        _positive(spec.scaling_factor, "vae.scaling_factor")
    return spec


def _clustering(fields: _Fields) -> ClusteringSpec:
    spec = ClusteringSpec(
        num_clusters=fields.get("num_clusters", int), method=fields.get("method", str, "kmeans-2stage"),
        embedding=fields.get("embedding", str, "pixel-pca"), fine_clusters=fields.get("fine_clusters", int, 64),
        seed=fields.get("seed", int, 0), assignment_sha256=fields.get("assignment_sha256", str, ""),
    )
    fields.done()
    if not 1 <= spec.num_clusters <= 1024:
        raise InvalidManifest("manifest field 'clustering.num_clusters' must be in [1, 1024]")
    if spec.fine_clusters < spec.num_clusters:
        raise InvalidManifest("manifest field 'clustering.fine_clusters' must be >= num_clusters")
    return spec


def _model(data: Any, path: str) -> ModelSpec:
    fields = _Fields(data, path)
    spec = ModelSpec(
        name=fields.get("name", str), objective=fields.get("objective", str),
        architecture=_plain(dict(fields.get("architecture", Mapping, {})), f"{path}.architecture"),
        training=_plain(dict(fields.get("training", Mapping, {})), f"{path}.training"),
    )
    fields.done()
    return spec


def _cluster_experts(data: Mapping) -> Tuple[Tuple[int, str], ...]:
    pairs = []
    for key, model in data.items():
        # a cluster number, as YAML writes it (1) or as JSON must ("1"); never 1.5, true or "01"
        if isinstance(key, int) and not isinstance(key, bool):
            cluster = key
        elif isinstance(key, str) and re.fullmatch(r"0|-?[1-9][0-9]{0,8}", key):
            cluster = int(key)
        else:
            raise InvalidManifest(f"manifest field 'cluster_experts' key {key!r:.40} is not a cluster number")
        if not isinstance(model, str):
            raise InvalidManifest(f"manifest field 'cluster_experts.{key}' must name an expert model")
        pairs.append((cluster, model))
    return tuple(sorted(pairs))


def _trust(fields: _Fields) -> TrustPolicy:
    policy = TrustPolicy(mode=fields.get("mode", str, "open"), signers=tuple(fields.get("signers", list, [])),
                         operator=fields.get("operator", str, ""))
    fields.done()
    if policy.operator and not is_signer_id(policy.operator):
        raise InvalidManifest("manifest field 'trust.operator' must be a signer id (64 hex chars)")
    if policy.mode not in ("open", "allowlist"):
        raise InvalidManifest("manifest field 'trust.mode' must be 'open' or 'allowlist'")
    bad = [s for s in policy.signers if not is_signer_id(s)]
    if bad:
        raise InvalidManifest(f"manifest field 'trust.signers' holds invalid signer ids (64 hex chars): {bad[:3]}")
    if policy.mode == "allowlist" and not policy.signers:
        raise InvalidManifest("manifest field 'trust.signers' must list signers when trust.mode is 'allowlist'")
    return policy


def _timing(fields: _Fields) -> Timing:
    timing = Timing(lease_s=fields.get("lease_s", float, 20.0),
                    checkpoint_every_steps=fields.get("checkpoint_every_steps", int, 200),
                    record_ttl_s=fields.get("record_ttl_s", float, 3600.0))
    fields.done()
    _positive(timing.lease_s, "timing.lease_s")
    _positive(timing.checkpoint_every_steps, "timing.checkpoint_every_steps")
    _positive(timing.record_ttl_s, "timing.record_ttl_s")
    return timing


def _sampling(fields: _Fields) -> SamplingDefaults:
    sampling = SamplingDefaults(steps=fields.get("steps", int, 20), guidance=fields.get("guidance", float, 2.0),
                                routing=fields.get("routing", str, "top2"))
    fields.done()
    _positive(sampling.steps, "sampling.steps")
    # which spellings mean a routing is `ddm_models.sampling.Routing`'s to say (checked with the model specs)
    if not 0 < len(sampling.routing) <= 16:
        raise InvalidManifest("manifest field 'sampling.routing' must be a routing name such as top2 or full")
    return sampling
