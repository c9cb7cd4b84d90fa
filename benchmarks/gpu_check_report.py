"""The summary of a ``benchmarks/gpu_check.sh`` run: ``gpu_check.json`` and ``gpu_check.md`` in its
output folder, from whatever steps finished (``steps.tsv``, ``gpu.txt``, ``env.txt``, ``kernels.xml``,
``precision/report.json``, ``latency.json``)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: Path) -> dict[str, int] | None:
    """Test counts of a junit XML file (None when the file is absent)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_env(path: Path) -> dict[str, str] | None:
    """The ``name: value`` lines of ``benchmarks/gpu_env.py`` (None when the file is absent)."""
    if not path.is_file():
        return None
    return dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


def summary(out: Path) -> dict:
    """Everything the run left in ``out``, as one JSON-able dict."""
    steps = []
    if (out / "steps.tsv").is_file():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps.append({"step": name, "exit": status, "seconds": int(seconds)})
    return {
        "gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else None,
        "env": read_env(out / "env.txt"),
        "steps": steps,
        "kernels": junit_counts(out / "kernels.xml"),
        "native": junit_counts(out / "native.xml"),
        "precision": read_json(out / "precision" / "report.json"),
        "latency": read_json(out / "latency.json"),
    }


def markdown(report: dict) -> str:
    """The summary as markdown tables."""
    lines = [f"# GPU check: {report['gpu'] or 'unknown GPU'}", ""]
    if report["env"]:
        lines += [", ".join(f"{name} {value}" for name, value in report["env"].items() if name != "device"), ""]
    lines += ["| step | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in report["steps"]]
    for name in ("kernels", "native"):
        counts = report[name]
        if counts:
            lines += ["", f"{name} tests: {counts['passed']} passed, {counts['failures']} failed, "
                      f"{counts['errors']} errors, {counts['skipped']} skipped"]
    precision = report["precision"]
    if precision:
        lines += ["", f"## Precision ({precision['model']}, {precision['size']}², {precision['steps']} steps)", "",
                  "| dtype | mode | finite | seconds | peak GiB | image PSNR to fp32 (dB) | latent rel. to fp32 | "
                  "loss-scale back-offs | VAE fp32 retries |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in precision["runs"]:
            lines.append(f"| {r['dtype']} | {r['mode']} | {r['finite']} | {r['seconds']} | {r['peak_memory_gib']} | "
                         f"{r.get('image_psnr_to_fp32_db', '—')} | {r.get('latent_rel_to_fp32', '—')} | "
                         f"{r['loss_scale_backoffs']} | {r['vae_float32_retries']} |")
    latency = report["latency"]
    if latency:
        lines += ["", f"## Edit latency ({latency['dtype']}, {latency['size']}², {latency['steps']} steps, "
                  f"{latency['rounds']} rounds)", "", "| runtime | first (s) | median (s) | min–max (s) |",
                  "| --- | --- | --- | --- |"]
        for name, r in latency["runtimes"].items():
            lines.append(f"| {name} | {r['first_s']} | {r['median_s']} | {r['min_s']}–{r['max_s']} |")
        lines += ["", f"eager / compiled (medians): {latency['eager_over_compiled']}×"]
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1])
    report = summary(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
