"""The local registry: publish -> list -> pull -> predict, immutable hashed versions, two processes
publishing at once, tamper detection; and the Hub push's errors when it cannot work."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from conftest import make_config, make_texts, write_csv
from lorakit.adapters.registry import Registry, RegistryError, parse_ref
from lorakit.cli import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("registry-run")
    run = lorakit.train(
        make_config(folder, tiny_bert_dir, write_csv(folder / "r.csv", make_texts(96)), train={"epochs": 1}),
        progress=False,
    )
    return run.adapter_dir


def _variant(adapter: Path, folder: Path, tag: str) -> Path:
    """A copy of the adapter with different content (its card), so it publishes as a new version."""
    out = folder / f"adapter-{tag}"
    shutil.copytree(adapter, out)
    with (out / "README.md").open("a") as fh:
        fh.write(f"\nvariant {tag}\n")
    return out


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return (e.value.code or 0), out.out, out.err


def test_publish_list_pull_predict_round_trip(adapter: Path, tmp_path: Path, capsys) -> None:
    reg = ["--registry", str(tmp_path / "reg")]
    code, out, _ = _cli(["publish", str(adapter.parent), "--name", "sentiment", *reg], capsys)
    assert code == 0 and out.startswith("published sentiment:1")
    code, out, _ = _cli(["publish", str(adapter), "--name", "sentiment", *reg], capsys)
    assert code == 0 and "already published as sentiment:1" in out  # same content: no new version
    _cli(["publish", str(_variant(adapter, tmp_path, "b")), "--name", "sentiment", *reg], capsys)

    code, out, _ = _cli(["registry", "list", *reg], capsys)
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "TASK"] and len(lines) == 3
    assert lines[1].split()[:3] == ["sentiment", "1", "text-classification"] and "test accuracy" in lines[1]

    code, out, _ = _cli(["registry", "show", "sentiment", *reg], capsys)
    shown = json.loads(out)
    assert shown["version"] == 2 and shown["files"]["adapter_model.safetensors"]["size"] > 0

    dest = tmp_path / "pulled"
    code, out, _ = _cli(["registry", "pull", "sentiment:1", "--to", str(dest), *reg], capsys)
    assert code == 0 and out.strip() == str(dest)
    texts = ["the film was wonderful", "boring and dull"]
    assert lorakit.predict(dest, texts) == lorakit.predict(adapter, texts)
    # The stored copy is read-only and identical to what was published.
    stored = Registry(tmp_path / "reg").get("sentiment:1").path
    assert (stored / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    assert not (stored / "adapter_model.safetensors").stat().st_mode & 0o222

    code, out, _ = _cli(["registry", "delete", "sentiment", *reg], capsys)
    assert code == 2
    code, out, _ = _cli(["registry", "delete", "sentiment:1", *reg], capsys)
    assert code == 0 and "deleted sentiment:1" in out and not stored.exists()
    assert [v.ref for v in Registry(tmp_path / "reg").list()] == ["sentiment:2"]
    assert Registry(tmp_path / "reg").get("sentiment").version == 2


def test_tampered_weights_are_refused_on_pull(adapter: Path, tmp_path: Path, capsys) -> None:
    reg = Registry(tmp_path / "reg")
    v, _ = reg.publish(adapter, "sentiment")
    weights = v.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor
    weights.write_bytes(bytes(data))
    code, _, err = _cli(
        ["registry", "pull", "sentiment:1", "--to", str(tmp_path / "x"), "--registry", str(reg.root)], capsys
    )
    assert code == 2 and "tampered" in err and "adapter_model.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    (v.path / "extra.bin").write_bytes(b"x")
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0x01]))  # weights restored, a file added
    with pytest.raises(RegistryError, match="added after publishing"):
        reg.pull("sentiment:1")


_PUBLISHER = """
import sys
from lorakit.adapters.registry import Registry
reg = Registry(sys.argv[1])
for path in sys.argv[2:]:
    print(reg.publish(path, "shared")[0].version, flush=True)
"""


@pytest.mark.slow  # two publishing processes
def test_two_processes_publishing_at_once_keep_the_index_intact(adapter: Path, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    batches = [[str(_variant(adapter, tmp_path, f"{p}-{i}")) for i in range(6)] for p in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER, str(root), *paths],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for paths in batches
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    versions = sorted(int(v) for out, _ in results for v in out.split())
    assert versions == list(range(1, 13))  # every publish got its own version, none lost
    con = sqlite3.connect(root / "index.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM versions").fetchone()[0] == 12
    reg = Registry(root)
    for v in reg.list("shared"):
        reg.verify(v.ref)  # every stored copy matches its recorded hashes
    assert not list((root / "adapters").glob(".incoming-*"))


def test_a_crash_between_rename_and_commit_is_repaired(adapter: Path, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(adapter, "sentiment")
    orphan = reg.root / "adapters" / "sentiment" / "v2"  # as if a publish died before its commit
    orphan.mkdir()
    (orphan / "half.bin").write_bytes(b"partial")
    v, new = reg.publish(_variant(adapter, tmp_path, "b"), "sentiment")
    assert new and v.version == 2 and not (v.path / "half.bin").exists()
    reg.verify("sentiment:2")


def test_the_headline_metric_is_the_one_the_run_selected_on(tmp_path: Path, tiny_bert_dir: Path) -> None:
    cfg = make_config(
        tmp_path,
        tiny_bert_dir,
        write_csv(tmp_path / "r.csv", make_texts(96)),
        train={"epochs": 1, "metric_for_best": "f1_macro"},  # not the task's default (accuracy)
    )
    run = lorakit.train(cfg, progress=False)
    v, _ = Registry(tmp_path / "reg").publish(run.adapter_dir, "sentiment")
    f1 = json.loads((run.adapter_dir / "lorakit.json").read_text())["metrics"]["test"]["f1_macro"]
    assert v.metric == f"test f1_macro {f1:.4f}"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("../etc", "not valid"),
        ("a/b", "not valid"),
        ("Upper", "not valid"),
        ("x:0", "positive number"),
        ("x:v-1", "positive number"),
        ("", "not valid"),
    ],
)
def test_bad_names_and_refs_are_refused(ref: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_ref(ref)


def test_unknown_version_and_missing_registry(adapter: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _cli(["registry", "pull", "nothing", "--registry", str(tmp_path / "none")], capsys)
    assert code == 2 and "no registry" in err
    Registry(tmp_path / "reg").publish(adapter, "sentiment")
    code, _, err = _cli(["registry", "show", "sentiment:7", "--registry", str(tmp_path / "reg")], capsys)
    assert code == 2 and "known versions: sentiment:1" in err


# ---- the Hub -------------------------------------------------------------------------------------


def test_hub_push_uploads_the_adapter_folder(adapter: Path, monkeypatch) -> None:
    import huggingface_hub

    from lorakit.adapters.hub import push_to_hub

    calls: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kw):
            calls["repo"] = (repo_id, kw)

        def upload_folder(self, folder_path, repo_id, **kw):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    url = push_to_hub(adapter.parent, "me/sentiment-lora", private=True)
    assert url.endswith("/commit/abc") and calls["token"] == "hf_test" and calls["repo"][1]["private"] is True
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "lorakit.json"} <= set(
        calls["files"]
    )


@pytest.mark.parametrize(
    ("env", "repo", "message"),
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}, "me/x", "offline mode"),
        ({"HF_TOKEN": ""}, "me/x", "no Hugging Face token"),
        ({"HF_TOKEN": "hf_x"}, "me/x/y", "not a Hub repo id"),
        (
            {"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "me/x",
            "cannot reach the Hugging Face Hub",
        ),
    ],
)
def test_hub_errors_are_one_line(
    adapter: Path, tmp_path: Path, monkeypatch, capsys, env: dict, repo: str, message: str
) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "HF_ENDPOINT" in env:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", env["HF_ENDPOINT"])
    code, _, err = _cli(["publish", str(adapter), "--hub", repo, "--registry", str(tmp_path / "reg")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
