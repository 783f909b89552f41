"""Bad input from users and files, met through the real `ddm-swarm` command line: every anticipated
failure is one line on stderr that names the problem (which file, which field, what to do), exit
status 1, no traceback, and nothing written or lost."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.swarm_harness import ROOT, child_env, run_cli

TINY = ROOT / "tests" / "manifests" / "tiny.yaml"


def refused(result, *phrases: str) -> str:
    """Assert a clean failure and return its error line."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output  # one line, even for a long message
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def manifest_with(tmp_path: Path, change) -> Path:
    data = yaml.safe_load(TINY.read_text())
    change(data)
    path = tmp_path / "swarm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("text, phrases", [
    ("name: [tiny\n", ["not valid YAML", "line 2"]),
    ("name: tiny\nname: other\n", ["not valid YAML", "'name' appears twice"]),
    ("name: tiny\n\t- x\n", ["not valid YAML", "line 2"]),
])
def test_a_manifest_that_is_not_valid_yaml_is_named_with_the_line(tmp_path, text, phrases):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    refused(run_cli("swarm", "show", "--swarm", str(path)), str(path), *phrases)


@pytest.mark.parametrize("change, phrases", [
    (lambda d: d["clustering"].update(num_clusters="two"), ["clustering.num_clusters", "must be an integer"]),
    (lambda d: d.update(colour="blue"), ["unknown field(s) colour"]),
    (lambda d: d.update(router=5), ["'router' must be a mapping"]),
    (lambda d: d.update(cluster_experts={1.5: "tiny-fm"}), ["cluster_experts", "not a cluster number"]),
    (lambda d: d["timing"].update(lease_s=-2), ["timing.lease_s", "positive"]),
])
def test_a_manifest_field_of_the_wrong_type_or_unknown_is_named(tmp_path, change, phrases):
    path = manifest_with(tmp_path, change)
    refused(run_cli("swarm", "show", "--swarm", str(path)), str(path), *phrases)


# The command line as `ddm-swarm` runs it, then the heavy libraries it had imported by the time it exited.
WHAT_WAS_IMPORTED = """
import runpy, sys
sys.argv = ["ddm-swarm", *sys.argv[1:]]
try:
    runpy.run_module("node.cli", run_name="__main__")
except SystemExit:
    pass
print("imported:", *sorted(m for m in ("torch", "hivemind", "diffusers", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("command", [["swarm", "show"], ["node"], ["status"]])
def test_a_mistake_in_the_manifest_is_reported_before_torch_or_hivemind_are_imported(tmp_path, command):
    # a typo costs a user a fraction of a second, not the seconds torch and hivemind take to import
    path = tmp_path / "broken.yaml"
    path.write_text("name: [tiny\n")
    result = subprocess.run([sys.executable, "-c", WHAT_WAS_IMPORTED, *command, "--swarm", str(path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=child_env(COLUMNS="200"))
    assert "not valid YAML" in result.stderr, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "imported:", result.stdout


def test_a_manifest_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    refused(run_cli("swarm", "show", "--swarm", str(path)), "cannot read manifest", str(path))


@pytest.mark.parametrize("change, phrases", [
    (lambda d: d["experts"][0].update(architecture={"size": "digits-8x8", "widht": 64}), ["model 'tiny-fm'", "widht"]),
    (lambda d: d["experts"][1]["architecture"].update(width=100, heads=3), ["model 'tiny-ddpm'", "multiple of heads"]),
    (lambda d: d.update(text_encoder="bert"), ["text_encoder", "unknown text encoder 'bert'"]),
])
def test_a_model_ddm_models_cannot_build_stops_the_node_before_it_writes_anything(tmp_path, change, phrases):
    path = manifest_with(tmp_path, change)
    data_dir = tmp_path / "node"
    refused(run_cli("node", "--swarm", str(path), "--data-dir", str(data_dir)), *phrases)
    assert not data_dir.exists()  # refused before joining: no identity, no claim, no files


@pytest.mark.parametrize("command", [["node"], ["status"], ["generate", "the digit 3"]])
def test_an_unknown_swarm_name_lists_the_bundled_swarms(command):
    refused(run_cli(*command, "--swarm", "no-such-swarm"), "unknown swarm 'no-such-swarm'", "local")


def test_a_missing_manifest_file_is_named():
    refused(run_cli("swarm", "show", "--swarm", "/nonexistent/swarm.yaml"), "/nonexistent/swarm.yaml does not exist")


@pytest.mark.parametrize("prompts, phrase", [
    ([""], "a prompt is empty"), (["   "], "a prompt is empty"), (["x" * 5000], "5000 characters long"),
    (["the digit 3", "--num", "0"], "--num must be >= 1"),
])
def test_empty_huge_or_too_many_prompts_are_refused_before_joining_the_swarm(prompts, phrase):
    refused(run_cli("generate", *prompts, "--swarm", str(TINY)), phrase)


def test_a_damaged_identity_file_is_named_and_left_as_it_was(tmp_path):
    key = tmp_path / "node" / "identity.pem"
    key.parent.mkdir()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    before = key.read_bytes()
    refused(run_cli("node", "--swarm", str(TINY), "--data-dir", str(key.parent)), str(key), "restore it from a backup")
    assert key.read_bytes() == before  # never replaced by a fresh key: that would change the node's signer


def test_a_damaged_libp2p_key_file_is_named(tmp_path):
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "p2p.key").write_bytes(b"\x0a\x05torn")
    (data_dir / "p2p.key").chmod(0o600)
    refused(run_cli("node", "--swarm", str(TINY), "--data-dir", str(data_dir)), str(data_dir / "p2p.key"), "delete it")


def test_a_data_dir_that_cannot_be_created_is_named(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the data dir's parent should be")
    data_dir = blocked / "node"  # nobody, not even root, can create a directory inside a file
    refused(run_cli("node", "--swarm", str(TINY), "--data-dir", str(data_dir)), str(data_dir))


@pytest.mark.parametrize("command", [["generate", "the digit 3"], ["node", "--data-dir", "NODE_DIR"], ["fetch", "--out", "OUT"]])
@pytest.mark.parametrize("device, phrase", [("tpu", "unknown device 'tpu'"), ("cuda:7", "cuda:7")])
def test_a_device_this_machine_lacks_is_named_before_anything_starts(tmp_path, command, device, phrase):
    args = [str(tmp_path / a) if a.isupper() else a for a in command]
    refused(run_cli(*args, "--swarm", str(TINY), "--device", device), "--device", phrase)
    assert not (tmp_path / "NODE_DIR").exists()


def test_a_generate_batch_size_below_one_is_refused_before_joining_the_swarm():
    refused(run_cli("generate", "the digit 3", "--swarm", str(TINY), "--batch-size", "0"), "--batch-size must be >= 1")
