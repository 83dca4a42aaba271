"""`v2m compare`'s HTML report, opened in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from tasks.evaluation.evaluate import evaluate
from tasks.registry.registry import register
from tasks.registry.report import compare
from tasks.training.finetune import finetune
from v2m.config import load_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture
def served(tmp_path: Path):
    """Serve a folder on loopback; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()


def test_report_renders_in_chromium_with_working_audio_and_mlflow_numbers(root: Path, served) -> None:
    assert CHROMIUM, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    p = load_params(root / "params.yaml")
    ft = finetune(p, "musicgen", "voice", root)
    version = register(ft.run_id, "musicgen")
    evaluate(p, root, f"voice2music-musicgen/{version}")
    index, evals, run_id = compare(p, root, [f"voice2music-musicgen/{version}", "base:musicgen"])
    assert index.is_file() and {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "report")} >= {
        "report/index.html", "report/audio", "report/img"}

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        page.goto(served(index.parent) + "/index.html", wait_until="networkidle")

        sources = page.eval_on_selector_all("audio", "els => els.map(e => e.getAttribute('src'))")
        assert len(sources) >= 3  # vocal, ground truth and one output per model for at least one test vocal
        for src in sources:
            assert (index.parent / src).is_file(), src
            resp = page.request.get(served(index.parent) + "/" + src)
            assert resp.status == 200 and resp.body()[:4] == b"RIFF", src
        durations = page.evaluate("""() => Promise.all([...document.querySelectorAll('audio')].map(a =>
            a.readyState >= 1 ? a.duration : new Promise(r => { a.onloadedmetadata = () => r(a.duration);
                                                               a.onerror = () => r(-1); a.load(); })))""")
        assert all(d > 0 for d in durations), durations
        images = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert images and all(w > 0 for w in images)

        # The aggregate table shows the numbers MLflow holds for each evaluation run.
        header = page.eval_on_selector_all("table[data-table='Aggregate'] tr:first-child th",
                                           "els => els.map(e => e.textContent)")[1:]
        assert header == [e.ref for e in evals]
        for metric in ("eval/harmonic_fit", "eval/fad"):
            cells = page.eval_on_selector_all(
                "table[data-table='Aggregate'] tr", f"""rows => rows.filter(r => r.querySelector('th')
                    .textContent === '{metric}').map(r => [...r.querySelectorAll('td')].map(td => td.textContent))""")[0]
            for cell, e in zip(cells, evals):
                assert cell == f"{mlflow.get_run(e.eval_run_id).data.metrics[metric]:.4f}", (metric, e.ref)
        assert page.locator("table[data-table^='Per genre'] td").count() > 0
        assert page.locator("table[data-table^='Per language'] td").count() > 0
        browser.close()
    assert errors == []
