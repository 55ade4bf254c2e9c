"""Benchmark of the web app as a person uses it: page load, upload → verdict (expert-only and with a tiny MLLM).

It runs the product as shipped: ``python -m eagle app`` in a subprocess on loopback (random-weight expert
backbone: the same compute as the real weights) driven by Debian's headless Chromium through Playwright,
the same way as ``tests/test_app_browser.py``. Measured:

1. ``startup``: the app process, spawn → first HTTP 200 on ``/``; ``page_load``: navigation start → the
   Inspect button visible, over fresh browser contexts (empty cache), timed inside the page.
2. ``expert_only``: the bank built once through the References tab (upload + build wall time), then
   upload → verdict for one image, alternating a good and a defective synthetic image: the file is set on
   ``#query-image``, the preview shows the uploaded file, ``#inspect`` is clicked, and the clock stops when
   ``#eagle-verdict``'s ``data-sha`` changes. The server's own ``total`` is read from the Timings JSON.
3. ``tiny_mllm``: a second app with ``EAGLE_MLLM__ENABLED=true`` and ``EAGLE_MLLM__MODEL_ID`` pointing at a
   tiny random-weight Qwen2.5-VL (``tests/tiny_models.py``), "Ask the MLLM" ticked; the first inspection
   (which loads the model) is reported apart from the following ones.

Usage:
    .venv/bin/python bench/bench_app.py                 # 1 + 10 inspections per mode, 5 page loads (~2 min, 2 cores)
    .venv/bin/python bench/bench_app.py --quick         # 1 + 4 inspections, 3 page loads, 6 references
    .venv/bin/python bench/bench_app.py --repeats 20 --skip-mllm

The result is ``bench/results/app-<date>.json`` (``-quick`` appended for quick runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import machine as bench_machine  # noqa: E402

from tests.browser_app import CHROMIUM, CHROMIUM_FLAGS, free_port, upload_references  # noqa: E402  (one browser set-up for test and bench)

VIEWPORT = {"width": 1400, "height": 1600}
BANK = "bench"

# Runs before the page's own scripts: stamps performance.now() (ms since navigation start) on the first
# animation frame in which the Inspect button has a box and is not hidden (Playwright's "visible").
INSPECT_VISIBLE_PROBE = """
(() => {
  const tick = () => {
    const el = document.getElementById('inspect');
    if (el) {
      const box = el.getBoundingClientRect();
      if (box.width > 0 && box.height > 0 && getComputedStyle(el).visibility !== 'hidden') {
        window.__inspectVisibleMs = performance.now();
        return;
      }
    }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})();
"""
NAVIGATION_FACTS = """
() => {
  const nav = performance.getEntriesByType('navigation')[0];
  return {
    inspect_visible_ms: window.__inspectVisibleMs,
    response_end_ms: nav ? nav.responseEnd : null,
    dom_content_loaded_ms: nav ? nav.domContentLoadedEventEnd : null,
    load_event_ms: nav ? nav.loadEventEnd : null,
    resources: performance.getEntriesByType('resource').length,
    transferred_kb: performance.getEntriesByType('resource').reduce((s, r) => s + (r.transferSize || 0), 0) / 1024,
  };
}
"""
# The verdict changed, or Gradio showed an error toast (then the sha never changes).
VERDICT_OR_ERROR = """
(prev) => {
  const v = document.querySelector('#eagle-verdict');
  if (v && v.getAttribute('data-sha') !== prev) return 'verdict';
  const toast = document.querySelector('[data-testid="toast-body"]');
  if (toast && /error/i.test(toast.className + ' ' + toast.innerText)) return 'error: ' + toast.innerText;
  return false;
}
"""
TIMINGS_JSON = """
() => {
  for (const block of document.querySelectorAll('[data-testid="json"]')) {
    const label = block.querySelector('[data-testid="block-label"]');
    if (label && label.innerText.includes('Timings')) {
      const holder = block.querySelector('.json-holder');
      return holder ? holder.innerText : null;
    }
  }
  return null;
}
"""


# ------------------------------------------------------------------------------------------------ helpers
def summarize(values: list[float]) -> dict | None:
    """Median, p95, mean, min, max and count of ``values`` (``None`` when empty), rounded."""
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    return {
        "median": round(float(np.median(array)), 1),
        "p95": round(float(np.percentile(array, 95)), 1),
        "mean": round(float(array.mean()), 1),
        "min": round(float(array.min()), 1),
        "max": round(float(array.max()), 1),
        "n": int(array.size),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(browser_version: str | None) -> dict:
    """CPU model, cores, RAM, Python and the versions of the libraries on the measured path."""
    info = bench_machine.machine_info(
        ("gradio", "playwright", "torch", "transformers", "onnxruntime", "faiss-cpu", "numpy")
    )
    info["versions"]["chromium"] = browser_version
    return info


def app_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The app's environment: expert-only, random backbone, the bench's data dir; ``extra`` overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAGLE_")}
    env.update(
        {
            "EAGLE_DATA_DIR": str(data_dir),
            "EAGLE_EXPERT__WEIGHTS": "random",
            "EAGLE_EXPERT__MIN_REFERENCES": "2",
            "EAGLE_EXPERT__RECOMMENDED_REFERENCES": "2",
            "EAGLE_MLLM__ENABLED": "false",
            "EAGLE_LOG_LEVEL": "WARNING",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        }
    )
    env.update(extra)
    return env


class App:
    """One ``python -m eagle app`` subprocess in its own process group; :meth:`stop` always ends it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "eagle", "app", "--host", "127.0.0.1", "--port", str(self.port)]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds from spawn to the first HTTP 200 on ``/`` (polled every 50 ms)."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.process.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"the app did not answer on {self.url} within {timeout:.0f} s")

    def rss_mb(self) -> float | None:
        import psutil

        try:
            return round(psutil.Process(self.process.pid).memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the app's own process group, SIGKILL after 20 s."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self._log.close()


@contextmanager
def running_app(env: dict[str, str], log_path: Path) -> Iterator[tuple[App, float]]:
    """Start the app, wait for HTTP 200; yields ``(app, startup seconds)`` and stops it whatever happens."""
    app = App(env, log_path)
    try:
        startup = app.wait_ready()
        yield app, startup
    except BaseException:
        print(f"--- app log ({log_path}):\n{app.log_tail()}", file=sys.stderr, flush=True)
        raise
    finally:
        app.stop()


def make_tiny_model(directory: Path) -> float:
    """Write the tiny random-weight Qwen2.5-VL in a child process (keeps torch out of this one); seconds."""
    code = "import sys; from pathlib import Path; from tests.tiny_models import make_tiny_qwen2_5_vl as m; "
    code += "m(Path(sys.argv[1]))"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"writing the tiny model failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def wait_for_onnx_cache(data_dir: Path, app: App, timeout: float = 600.0) -> float:
    """Seconds from the app's spawn until its start-up warm-up has the ONNX graph cached (sidecar written last)."""
    cache = data_dir / "cache" / "onnx"
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        sidecars = list(cache.glob("*.json")) if cache.is_dir() else []
        if sidecars:
            return max(p.stat().st_mtime for p in sidecars) - (time.time() - (time.perf_counter() - app.started))
        if app.process.poll() is not None:
            raise RuntimeError(f"the app exited with code {app.process.returncode}; log: {app.log_path}")
        time.sleep(0.1)
    raise TimeoutError(f"no cached ONNX graph under {cache} within {timeout:.0f} s (start-up warm-up failed?)")


# ------------------------------------------------------------------------------------------- measurements
def measure_page_loads(browser, url: str, count: int) -> list[dict]:
    """``count`` fresh page loads (new context each: empty cache and storage); timings from the page."""
    loads = []
    for _ in range(count):
        context = browser.new_context(viewport=VIEWPORT)
        try:
            context.add_init_script(INSPECT_VISIBLE_PROBE)
            page = context.new_page()
            started = time.perf_counter()
            page.goto(url)
            page.wait_for_function("() => window.__inspectVisibleMs !== undefined", timeout=120_000)
            wall_ms = (time.perf_counter() - started) * 1000
            facts = page.evaluate(NAVIGATION_FACTS)
            facts["wall_ms_from_goto"] = wall_ms
            loads.append({k: round(v, 1) if isinstance(v, float) else v for k, v in facts.items()})
        finally:
            context.close()
    return loads


def build_bank_in_ui(page, references: list[Path]) -> dict:
    """Upload references and build the bank through the References tab; wall times in seconds."""
    page.get_by_role("tab", name="References").click()
    started = time.perf_counter()
    upload_references(page, references)  # returns once every file is on the server
    uploaded = time.perf_counter()
    page.locator("#bank-name textarea, #bank-name input").first.fill(BANK)
    page.locator("#build-bank").click()
    page.wait_for_function(
        "() => { const f = document.querySelector('#bank-facts'); return f && f.innerText.includes('references'); }",
        timeout=900_000,
    )
    done = time.perf_counter()
    facts = page.inner_text("#bank-facts")
    if f"{len(references)} references" not in facts:
        raise RuntimeError(f"the bank facts do not show {len(references)} references: {facts!r}")
    page.get_by_role("tab", name="Inspect").click()
    return {
        "references": len(references),
        "upload_s": round(uploaded - started, 2),
        "build_s": round(done - uploaded, 2),
        "upload_and_build_s": round(done - started, 2),
        "facts": facts.strip(),
    }


def _server_timings(page) -> dict[str, float] | None:
    text = page.evaluate(TIMINGS_JSON)
    if not text:
        return None
    try:
        return json.loads("".join(text.split("\n")))
    except json.JSONDecodeError:
        return None


def inspect_once(page, image: Path, timeout_ms: int) -> dict:
    """Upload ``image``, click Inspect, wait for a new verdict; upload/inspect/total wall times in ms."""
    verdict = page.locator("#eagle-verdict")
    before_sha = verdict.get_attribute("data-sha") if verdict.count() else ""
    preview = page.locator("#query-image img")
    before_src = preview.first.get_attribute("src") if preview.count() else None
    started = time.perf_counter()
    page.locator("#query-image input[type=file]").set_input_files(str(image))
    page.wait_for_function(
        "(prev) => { const img = document.querySelector('#query-image img');"
        " return img && img.getAttribute('src') && img.getAttribute('src') !== prev; }",
        arg=before_src,
        timeout=120_000,
    )
    uploaded = time.perf_counter()
    page.locator("#inspect").click()
    outcome = page.wait_for_function(VERDICT_OR_ERROR, arg=before_sha, timeout=timeout_ms).json_value()
    done = time.perf_counter()
    if outcome != "verdict":
        raise RuntimeError(f"inspecting {image.name} failed in the page: {outcome}")
    text = page.inner_text("#eagle-verdict")
    return {
        "image": f"{image.parent.name}/{image.name}",
        "expected": "no_defect" if image.parent.name == "good" else "defect",
        "verdict": verdict.get_attribute("data-verdict"),
        "decided_by": "MLLM" if "decided by MLLM" in text else "expert",
        "upload_ms": round((uploaded - started) * 1000, 1),
        "inspect_ms": round((done - uploaded) * 1000, 1),
        "total_ms": round((done - started) * 1000, 1),
        "server_ms": _server_timings(page),
    }


def alternating(goods: list[Path], defects: list[Path], count: int) -> list[Path]:
    """good, defective, good, … cycling through both lists (no image twice in a row)."""
    return [goods[(i // 2) % len(goods)] if i % 2 == 0 else defects[(i // 2) % len(defects)] for i in range(count)]


def inspection_series(page, images: list[Path], *, timeout_ms: int, label: str) -> list[dict]:
    runs = []
    for k, image in enumerate(images, 1):
        run = inspect_once(page, image, timeout_ms)
        runs.append(run)
        print(
            f"  {label} {k}/{len(images)}: {run['image']:<18} {run['verdict']:<10} by {run['decided_by']:<6} "
            f"upload→verdict {run['total_ms']:8.1f} ms (server {(run['server_ms'] or {}).get('total', '?')} ms)",
            flush=True,
        )
    return runs


def series_summary(runs: list[dict]) -> dict:
    """First inspection apart; median/p95 of the following ones (and of all)."""
    warm = runs[1:]

    def stats(rows: list[dict], key: str) -> dict | None:
        return summarize([r[key] for r in rows])

    def server(rows: list[dict]) -> dict | None:
        return summarize([r["server_ms"]["total"] for r in rows if r["server_ms"] and "total" in r["server_ms"]])

    return {
        "first": {k: runs[0][k] for k in ("upload_ms", "inspect_ms", "total_ms")}
        | {"server_total_ms": _total(runs[0]), "click_to_verdict_outside_server_ms": _outside(runs[0])},
        "following": {
            "upload_to_verdict_ms": stats(warm, "total_ms"),
            "upload_ms": stats(warm, "upload_ms"),
            "click_to_verdict_ms": stats(warm, "inspect_ms"),
            "server_total_ms": server(warm),
        },
        "all": {"upload_to_verdict_ms": stats(runs, "total_ms"), "server_total_ms": server(runs)},
        "verdicts_as_expected": sum(r["verdict"] == r["expected"] for r in runs),
        "decided_by": sorted({r["decided_by"] for r in runs}),
        "runs": runs,
    }


def _total(run: dict) -> float | None:
    return (run["server_ms"] or {}).get("total")


def _outside(run: dict) -> float | None:
    """Click → verdict minus the pipeline's own total: queue, model loading (first MLLM call), transport, render."""
    total = _total(run)
    return None if total is None else round(run["inspect_ms"] - total, 1)


# ---------------------------------------------------------------------------------------------- phases
def expert_phase(browser, args, work: Path, references: list[Path], queries: list[Path]) -> dict:
    print("expert-only app: starting ...", flush=True)
    load_before = load_average()
    with running_app(app_env(work / "data"), work / "app-expert.log") as (app, startup):
        print(f"  start-up {startup:.2f} s; {args.page_loads} fresh page loads ...", flush=True)
        rss_start = app.rss_mb()
        loads = measure_page_loads(browser, app.url, args.page_loads)
        context = browser.new_context(viewport=VIEWPORT)
        try:
            page = context.new_page()
            page.goto(app.url)
            page.locator("#inspect").wait_for(state="visible", timeout=120_000)
            warm_s = wait_for_onnx_cache(work / "data", app)
            print(f"  ONNX graph cached by the start-up warm-up {warm_s:.1f} s after spawn", flush=True)
            print(f"  building the bank from {len(references)} references through the UI ...", flush=True)
            bank = build_bank_in_ui(page, references)
            bank["onnx_warm_up_s_after_spawn"] = round(warm_s, 2)
            print(f"  upload {bank['upload_s']} s, build {bank['build_s']} s", flush=True)
            runs = inspection_series(page, queries, timeout_ms=300_000, label="expert")
            # The goal: references uploaded → bank built → first query uploaded → its verdict shown.
            bank["upload_to_first_verdict_s"] = round(bank["upload_and_build_s"] + runs[0]["total_ms"] / 1000, 2)
            print(f"  references upload → first verdict {bank['upload_to_first_verdict_s']} s", flush=True)
        finally:
            context.close()
        rss_end = app.rss_mb()
    return {
        "startup_s": round(startup, 2),
        "page_load_ms": summarize([x["inspect_visible_ms"] for x in loads]),
        "page_loads": loads,
        "bank_build": bank,
        "inspections": series_summary(runs),
        "app_rss_mb": {"after_startup": rss_start, "end": rss_end},
        "load_average": {"before": load_before, "after": load_average()},
    }


def mllm_phase(browser, args, work: Path, queries: list[Path]) -> dict:
    model_dir = work / "tiny-qwen2.5-vl"
    print("tiny MLLM app: writing the tiny random-weight Qwen2.5-VL ...", flush=True)
    model_s = make_tiny_model(model_dir)
    load_before = load_average()
    env = app_env(work / "data", EAGLE_MLLM__ENABLED="true", EAGLE_MLLM__MODEL_ID=str(model_dir))
    with running_app(env, work / "app-mllm.log") as (app, startup):
        print(f"  start-up {startup:.2f} s (the model loads on the first inspection)", flush=True)
        context = browser.new_context(viewport=VIEWPORT)
        try:
            page = context.new_page()
            page.goto(app.url)
            page.locator("#inspect").wait_for(state="visible", timeout=120_000)
            ask = page.get_by_label("Ask the MLLM")
            ask.check()
            if not ask.is_checked():
                raise RuntimeError("'Ask the MLLM' could not be ticked (is the MLLM enabled?)")
            runs = inspection_series(page, queries, timeout_ms=600_000, label="tiny-mllm")
            status = page.inner_text("#mllm-status")
        finally:
            context.close()
        rss_end = app.rss_mb()
    if any(r["decided_by"] != "MLLM" for r in runs):
        print("  warning: some inspections were decided by the expert only (see the app log)", flush=True)
    return {
        "model": "tiny random-weight Qwen2.5-VL (tests/tiny_models.py: 16 layers x 64, fp32 on CPU)",
        "model_write_s": round(model_s, 2),
        "startup_s": round(startup, 2),
        "inspections": series_summary(runs),
        "mllm_status": status.strip(),
        "app_rss_mb": {"end": rss_end},
        "load_average": {"before": load_before, "after": load_average()},
    }


# ----------------------------------------------------------------------------------------------- report
def print_table(report: dict) -> None:
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, stats: dict | None, unit: str = "ms") -> None:
        if stats:
            rows.append((name, f"{stats['median']:.1f} {unit}", f"{stats['p95']:.1f} {unit}", str(stats["n"])))

    expert = report["expert_only"]
    rows.append(("app start-up (spawn → HTTP 200)", f"{expert['startup_s']:.2f} s", "", "1"))
    add("page load (navigation → Inspect visible)", expert["page_load_ms"])
    bank = expert["bank_build"]
    rows.append((f"bank build in UI ({bank['references']} refs, after upload)", f"{bank['build_s']:.2f} s", "", "1"))
    if "upload_to_first_verdict_s" in bank:
        rows.append(
            (f"{bank['references']} refs upload → first verdict", f"{bank['upload_to_first_verdict_s']:.2f} s", "", "1")
        )
    inspections = expert["inspections"]
    rows.append(("expert-only: first upload → verdict", f"{inspections['first']['total_ms']:.1f} ms", "", "1"))
    add("expert-only: upload → verdict", inspections["following"]["upload_to_verdict_ms"])
    add("expert-only: server total", inspections["following"]["server_total_ms"])
    mllm = report.get("tiny_mllm")
    if mllm:
        inspections = mllm["inspections"]
        rows.append(("tiny MLLM app start-up", f"{mllm['startup_s']:.2f} s", "", "1"))
        first = f"{inspections['first']['total_ms']:.1f} ms"
        rows.append(("tiny MLLM: first (loads model) upload → verdict", first, "", "1"))
        add("tiny MLLM: upload → verdict", inspections["following"]["upload_to_verdict_ms"])
        add("tiny MLLM: server total", inspections["following"]["server_total_ms"])
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'median':>12}  {'p95':>12}  {'n':>3}")
    print("-" * (width + 35))
    for name, median, p95, n in rows:
        print(f"{name:<{width}}  {median:>12}  {p95:>12}  {n:>3}")
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="Inspections after the first (default 10, quick 4).")
    parser.add_argument("--page-loads", type=int, default=None, help="Fresh page loads (default 5, quick 3).")
    parser.add_argument("--references", type=int, default=None, help="Bank references (default 12, quick 6).")
    parser.add_argument("--quick", action="store_true", help="Fewer repeats and references: a quick look.")
    parser.add_argument("--skip-mllm", action="store_true", help="Only the expert-only app.")
    parser.add_argument("--out", type=Path, default=None, help="Result file (default bench/results/app-<date>.json).")
    args = parser.parse_args()
    args.repeats = args.repeats if args.repeats is not None else (4 if args.quick else 10)
    args.page_loads = args.page_loads if args.page_loads is not None else (3 if args.quick else 5)
    args.references = args.references if args.references is not None else (6 if args.quick else 12)
    if args.repeats < 1 or args.page_loads < 1 or args.references < 2:
        parser.error("--repeats and --page-loads must be ≥ 1, --references ≥ 2")
    if args.out is None:
        suffix = "-quick" if args.quick else ""
        args.out = RESULTS / f"app-{dt.date.today().isoformat()}{suffix}.json"
    return args


def _raise_on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    args = parse_args()
    if CHROMIUM is None:
        print("Debian's chromium is not installed (apt-get install chromium).", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so the finally blocks stop the apps and the browser
    from playwright.sync_api import sync_playwright

    from tests.synthetic import make_mvtec_like

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="eagle-bench-app-") as tmp:
        work = Path(tmp)
        root = make_mvtec_like(work / "mvtec", n_train=args.references, n_test_good=6, n_test_bad_per_type=2)
        category = root / "widget"
        references = sorted((category / "train" / "good").glob("*.png"))
        goods = sorted((category / "test" / "good").glob("*.png"))
        defects = sorted(p for d in sorted((category / "test").iterdir()) if d.name != "good" for p in d.glob("*.png"))
        queries = alternating(goods, defects, args.repeats + 1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                report = {
                    "benchmark": "web app (Gradio) in headless Chromium: page load, upload → verdict",
                    "date": dt.datetime.now().isoformat(timespec="seconds"),
                    "machine": machine_info(browser.version),
                    "note": "shared machine: other jobs ran at the same time; compare runs at similar load averages",
                    "settings": {
                        "quick": args.quick,
                        "repeats_after_first": args.repeats,
                        "page_loads": args.page_loads,
                        "references": len(references),
                        "query_images": "alternating good / defective synthetic images (tests/synthetic.py)",
                        "expert": "random-weight WideResNet-50-2 (same compute as real weights), 224 crop",
                        "app_threads": os.cpu_count(),
                    },
                    "load_average_before": load_before,
                }
                report["expert_only"] = expert_phase(browser, args, work, references, queries)
                if not args.skip_mllm:
                    try:
                        report["tiny_mllm"] = mllm_phase(browser, args, work, queries)
                    except Exception as err:  # noqa: BLE001 - keep the expert numbers; say what failed
                        print(f"tiny MLLM phase failed: {err}", file=sys.stderr, flush=True)
                        report["tiny_mllm_error"] = f"{type(err).__name__}: {err}"
            finally:
                browser.close()
    report["load_average_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_table(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
