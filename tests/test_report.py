"""The HTML report: self-contained, escapes hostile rows, worst pairs first; rendered in a real headless browser
(Debian's chromium, which .ci/run installs) with no console errors, the right rows and decoded images."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from adpo.data import load_adpo_dataset
from adpo.evaluate import derive, summarise
from adpo.pairs import check, swap
from adpo.report import check_report, eval_report
from adpo.synthetic import COLOURS, draw_shape

HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=\"document.body.setAttribute('data-pwned',1)\">"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser: Debian's chromium package is not installed (.ci/run installs it with "
                "apt-get when apt is available; here it was not)")


def browse(page: Path, tmp_path: Path, *extra: str, url_suffix: str = "") -> subprocess.CompletedProcess:
    """Open ``page`` from disk headless; stdout is the DOM after the page's scripts ran."""
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *extra,
         page.resolve().as_uri() + url_suffix],
        capture_output=True, text=True, timeout=120,
    )


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    """12 pairs of red/blue/green/yellow shapes; row 3 hostile; row 5 refers to a missing image."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    rows = []
    colours = sorted(COLOURS)
    for k in range(12):
        chosen, rejected = colours[k % 4], colours[(k + 1) % 4]
        for colour in (chosen, rejected):
            draw_shape("square", colour, size=64).save(folder / f"img/{colour}.png")
        rows.append({"response": f"The square is {chosen}.", "chosen": "What colour is the square?",
                     "chosen_images": [f"img/{chosen}.png"], "rejected": "What colour is the square?",
                     "rejected_images": [f"img/{rejected}.png"], "kind": "ab"[k % 2]})
    rows[3]["response"] = rows[3]["chosen"] = HOSTILE
    rows[3]["kind"] = HOSTILE
    rows[5]["rejected_images"] = ["img/missing.png"]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_page_is_self_contained_and_escapes_user_text(pairs_file: Path, tmp_path: Path):
    page = check_report(check(str(pairs_file)), str(pairs_file), tmp_path / "check.html").read_text()
    assert HOSTILE not in page and "<script>document.title" not in page
    assert "&lt;script&gt;document.title=&#x27;PWNED&#x27;&lt;/script&gt;" in page
    # Nothing is fetched: every src/href is inline data, no url(...) in the style.
    assert re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page) == []
    assert "url(" not in page and "@import" not in page
    assert page.count("<script>") == 1  # only the page's own sort/filter script


def test_check_report_in_a_headless_browser(pairs_file: Path, tmp_path: Path):
    path = check_report(check(str(pairs_file)), str(pairs_file), tmp_path / "check.html")
    proc = browse(path, tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []  # no script error, no failed load
    dom = proc.stdout
    assert "12 of 12 rows shown" in dom  # the page's script ran
    table = dom[dom.index('id="pairs"'):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    assert body.count("<tr") == 12
    # 23 thumbnails decoded (row 5's missing image is shown as text), and the script counted them.
    assert 'data-images="23/23"' in dom and body.count("unreadable image") == 1
    body_tag = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-pwned" not in body_tag and "<title>ADPO dataset check" in dom  # the hostile markup never ran
    # The refused row comes first (worst first).
    first = body[: body.index("</tr>")]
    assert "refused" in first and "image file not found" in first

    # The script filters by group and sorts (views opened by the link's fragment).
    filtered = browse(path, tmp_path, "--dump-dom", url_suffix="#group=refused").stdout
    assert "1 of 12 rows shown" in filtered
    shown = [row for row in filtered.split("<tr")[1:] if 'data-group' in row and 'display: none' not in row]
    assert len(shown) == 1 and "refused" in shown[0]
    by_row = browse(path, tmp_path, "--dump-dom", url_suffix="#sort=-0").stdout
    table = by_row[by_row.index('id="pairs"'):]
    rows = re.findall(r'<tr data-group="[^"]*"><td class="num" data-v="([0-9]+)"', table)
    assert rows == [str(k) for k in range(11, -1, -1)]  # row numbers, descending


def test_report_images_are_visible_in_a_screenshot(pairs_file: Path, tmp_path: Path):
    from PIL import Image

    path = check_report(check(str(pairs_file)), str(pairs_file), tmp_path / "check.html")
    shot = tmp_path / "shot.png"
    proc = browse(path, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # Every shape colour shows up as a block of thumbnail pixels (a failed decode would leave blanks).
    for name, rgb in COLOURS.items():
        near = int((np.abs(pixels - np.array(rgb)) <= 12).all(-1).sum())
        assert near > 2000, (name, near)


def test_eval_report_orders_worst_first_and_filters_by_group(pairs_file: Path, tmp_path: Path):
    dataset = load_adpo_dataset(str(pairs_file))
    records = [derive({"row": k, "kind": dataset[k]["kind"], "logp_chosen": -10.0 + k % 5,
                       "logp_rejected": -12.0 + k, "ref_logp_chosen": -11.0, "ref_logp_rejected": -11.0}, 0.1)
               for k in range(len(dataset))]
    report = {"dataset": str(pairs_file), "split": "train", "beta": 0.1,
              "models": {"model": summarise(records, ["kind"])}}
    path = eval_report(report, {"model": records}, dataset, tmp_path / "eval.html", group_by=["kind"])
    page = path.read_text()
    margins = [float(m) for m in re.findall(r'<td class="num" data-v="(-?[0-9.e+-]+)">', page)[1::7]]
    assert margins == sorted(r["logp_margin"] for r in records)  # worst margin first
    groups = re.findall(r'<option value="([^"]*)">', page)
    assert sorted(groups) == sorted(["", "a", "b", html.escape(HOSTILE, quote=True)])  # "": all groups
    proc = browse(path, tmp_path, "--dump-dom")
    assert console_messages(proc.stderr) == [] and "12 of 12 rows shown" in proc.stdout
    assert 'data-images="23/23"' in proc.stdout


def test_swap_output_checks_clean_in_the_browser(tmp_path: Path):
    """adpo-data swap → adpo-data check --html: a page with every built pair."""
    folder = tmp_path / "src"
    (folder / "img").mkdir(parents=True)
    lines = []
    for colour in sorted(COLOURS):
        draw_shape("circle", colour).save(folder / f"img/{colour}.png")
        lines.append(json.dumps({"images": [f"img/{colour}.png"], "prompt": "Colour?", "response": colour}))
    (folder / "vqa.jsonl").write_text("\n".join(lines))
    swap(str(folder / "vqa.jsonl"), tmp_path / "pairs.jsonl", negatives=3)
    from adpo.cli.data import main

    assert main(["check", str(tmp_path / "pairs.jsonl"), str(tmp_path / "check.json"), "--html",
                 str(tmp_path / "check.html")]) == 0
    summary = json.loads((tmp_path / "check.json").read_text())["summary"]
    assert summary["rows"] == 12 and summary["refused"] == 0 and summary["identical_sides"] == 0
    proc = browse(tmp_path / "check.html", tmp_path, "--dump-dom")
    assert console_messages(proc.stderr) == [] and "12 of 12 rows shown" in proc.stdout
