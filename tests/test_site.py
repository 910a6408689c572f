"""The course website (`course site build` / `serve`, course_lib/site.py).

The fast tests check the pieces against hand-written MyST pages and hand-computed links. The browser tests
build the real site once (the nine notebooks executed in the tiny profile, then Jupyter Book 2), serve it on
a free 127.0.0.1 port and open it in headless Chromium with Playwright. They skip, with the reason, only where
Chromium (or Playwright, or Jupyter Book) is missing and this is not CI; in CI they run.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from _course import one_error_line

from course_lib import site

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------------------------- fast tests


def course(*args):
    return subprocess.run([sys.executable, "-m", "course_lib.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("url, depth, expected", [
    ("/", 0, "./"), ("/", 1, "../"), ("/index", 1, "../"),
    ("/lora", 0, "lora/"), ("/lora", 1, "../lora/"), ("/lora#merge", 1, "../lora/#merge"),
    ("/fig-1a2b.png", 1, "../fig-1a2b.png"), ("#top", 1, "#top"),
    ("https://example.org/x", 1, "https://example.org/x"),
])
def test_site_paths_become_relative_links(url, depth, expected):
    assert site._rel(url, depth, "index") == expected


def _myst_site(tmp_path: Path) -> Path:
    """A two-page site in the shape `jupyter-book build --site` writes (config.json, content/, public/)."""
    root = tmp_path / "_build" / "site"
    (root / "content").mkdir(parents=True)
    (root / "public").mkdir()
    (root / "public" / "fig-abc.png").write_bytes(b"\x89PNG fake")
    config = {"title": "Course", "projects": [{"index": "index", "pages": [
        {"title": "The steps", "level": 1}, {"slug": "attention", "title": "Step 3 <attention>", "level": 2}]}]}
    (root / "config.json").write_text(json.dumps(config))
    text = lambda v: {"type": "text", "value": v}  # noqa: E731
    landing = {"type": "root", "children": [
        {"type": "heading", "depth": 2, "html_id": "why", "children": [text("Why")]},
        {"type": "paragraph", "children": [
            text("a < b, see "), {"type": "link", "url": "/attention", "children": [text("step 3")]}]},
        {"type": "heading", "depth": 3, "html_id": "before-class", "children": [text("1. Before class: set-up")]},
        {"type": "paragraph", "children": [{"type": "link", "url": "#1-before-class-set-up", "children": [text("up")]},
                                           {"type": "link", "url": "timings/", "children": [text("logs")]}]}]}
    cell = {"type": "block", "kind": "notebook-code", "children": [
        {"type": "code", "lang": "python", "value": "print('<x>')"},
        {"type": "outputs", "children": [
            {"type": "output", "jupyter_data": {"output_type": "stream", "name": "stdout", "text": "<x>\n"}},
            {"type": "output", "jupyter_data": {"output_type": "display_data", "data": {
                "image/png": {"content_type": "image/png", "path": "/fig-abc.png"},
                "text/plain": {"content_type": "text/plain", "content": "<Figure>"}}}}]}]}
    pages = {"index": ({"title": "Course"}, landing),
             "attention": ({"title": "Step 3 <attention>"}, {"type": "root", "children": [cell]})}
    for slug, (front, mdast) in pages.items():
        (root / "content" / f"{slug}.json").write_text(json.dumps({"frontmatter": front, "mdast": mdast}))
    return root


def test_render_site_writes_pages_links_outputs_and_files(tmp_path):
    out, notes = tmp_path / "html", []
    slugs = site.render_site(_myst_site(tmp_path), out, css=ROOT / "site" / "theme" / "style.css", log=notes.append)
    assert slugs == ["index", "attention"]
    landing = (out / "index.html").read_text()
    step = (out / "attention" / "index.html").read_text()
    assert '<h2 id="why">Why</h2>' in landing
    assert '<p>a &lt; b, see <a href="attention/">step 3</a></p>' in landing
    assert '<a href="attention/">Step 3 &lt;attention&gt;</a>' in landing  # the navigation, escaped
    assert '<li class="group">The steps</li>' in landing
    # GitHub's anchor for a heading works too; a link MyST could not resolve is text, not a 404
    assert '<h3 id="before-class"><span id="1-before-class-set-up"></span>1. Before class: set-up</h3>' in landing
    assert '<a href="#1-before-class-set-up">up</a>' in landing
    assert '<span class="unresolved-link" title="timings/">logs</span>' in landing
    assert notes == ["note: page index links to timings/, which is not in the site; shown as text"]
    assert "<h1>Step 3 &lt;attention&gt;</h1>" in step
    assert "print(&#x27;&lt;x&gt;&#x27;)" in step and '<pre class="stream">&lt;x&gt;\n</pre>' in step
    assert '<img src="../fig-abc.png"' in step and "&lt;Figure&gt;" not in step  # the image, not its text
    assert 'href="../style.css"' in step and 'href="../"' in step  # back to the landing page
    assert (out / "fig-abc.png").read_bytes() == b"\x89PNG fake" and (out / "style.css").is_file()


def test_api_pages_show_unquoted_signatures_and_docstrings(tmp_path, monkeypatch):
    pkg = tmp_path / "mini_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A tiny package."""\n')
    (pkg / "tools.py").write_text(
        'from __future__ import annotations\n__all__ = ["scale", "Box"]\n\n'
        'def scale(x: list[int], k: int = 2) -> list[int]:\n'
        '    """Multiply every ``x`` by k.\n\n    Args:\n        x: the <values>.\n    """\n    return x\n\n'
        'class Box:\n    """A box."""\n\n    def open(self, force: bool = False) -> None:\n        """Open it."""\n\n'
        'def _hidden():\n    pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    pages = site.write_api_pages(tmp_path / "api", package="mini_pkg")
    assert [p.name for p in pages] == ["mini_pkg.tools.md"]
    text = pages[0].read_text()
    assert "scale(x: list[int], k: int = 2) -> list[int]" in text  # not 'list[int]'
    assert "Multiply every `x` by k." in text and "    x: the <values>." in text  # the rest preformatted
    assert "### `Box.open`" in text and "open(self, force: bool = False) -> None" in text
    assert "_hidden" not in text
    index = (tmp_path / "api" / "reference.md").read_text()
    assert "A tiny package." in index and "[`mini_pkg.tools`](mini_pkg.tools.md)" in index


def test_build_refuses_a_folder_holding_other_files(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        site.build_site(out, root=ROOT)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    r = course("site", "build", "--out", str(out))
    assert r.returncode == 2 and "holds other files" in one_error_line(r.stderr)
    r = course("site", "build", "--out", str(out / "notes.txt"))
    assert r.returncode == 2 and "is a file" in one_error_line(r.stderr)


def test_a_rebuild_replaces_only_a_site_built_earlier(tmp_path):
    out, new = tmp_path / "site", tmp_path / "new"
    out.mkdir()
    (out / site.MARKER).write_text("")
    (out / "old.html").write_text("old")
    new.mkdir()
    (new / "index.html").write_text("new")
    site._check_out(out)  # a site built earlier: allowed
    site._replace(new, out)
    assert sorted(p.name for p in out.iterdir()) == [site.MARKER, "index.html"]
    assert not new.exists() and [p.name for p in tmp_path.iterdir()] == ["site"]  # no leftovers


def test_serve_refuses_a_folder_without_a_site_and_bad_ports(tmp_path):
    r = course("site", "serve", "--dir", str(tmp_path))
    assert r.returncode == 2 and "no built site" in one_error_line(r.stderr)
    (tmp_path / "index.html").write_text("<p>hi</p>")
    r = course("site", "serve", "--dir", str(tmp_path), "--port", "70000")
    assert r.returncode == 2 and "65535" in one_error_line(r.stderr)
    with pytest.raises(TypeError, match="port must be an integer"):
        site.make_server(tmp_path, port="80")


# ----------------------------------------------------------------------------------- browser tests


def _chromium() -> str | None:
    return os.environ.get("COURSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return 'Playwright is not installed (pip install -e ".[dev]")'
    if _chromium() is None:
        return "Chromium is not installed (apt-get install chromium)"
    try:
        site._find_jupyter_book()
    except RuntimeError as err:
        return str(err)
    return None


BUILD: dict = {}   # what the build fixture saw


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real site, built once into a temporary folder and served on a free 127.0.0.1 port."""
    reason = _missing()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"the website's browser tests must run in CI: {reason}")
        print(f"\nskipping the website's browser tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("site") / "site"
    start = time.perf_counter()
    lines: list[str] = []
    progress = Path(os.environ["COURSE_PROGRESS_FILE"])      # the test session's (conftest.py)
    before = progress.read_bytes() if progress.exists() else None
    site.build_site(out, root=ROOT, log=lines.append)
    after = progress.read_bytes() if progress.exists() else None
    BUILD["progress untouched"] = before == after          # the notebooks' Ha/Ri cells recorded elsewhere
    print(f"\nsite built in {time.perf_counter() - start:.0f} s:\n  " + "\n  ".join(lines), file=sys.stderr)
    server = site.make_server(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda err: page.problems.append(f"page error: {err}"))
    yield page
    page.close()


def test_landing_page_loads_without_console_errors(served, page):
    out, base = served
    response = page.goto(base)
    assert response.status == 200
    page.wait_for_load_state("load")
    assert page.problems == []
    assert page.title() == "The LLM Sovereignty Stack"
    assert page.locator("main h1").first.inner_text() == "The LLM Sovereignty Stack"  # the README's title
    assert (out / site.MARKER).is_file()


def test_every_step_is_reachable_from_the_navigation(served, page):
    _, base = served
    for step in range(1, 10):
        page.goto(base)
        page.locator("nav.toc a", has_text=f"Step {step} —").first.click()
        page.wait_for_load_state("load")
        assert page.locator("main h1").first.inner_text().startswith(f"Step {step} —"), page.url
        assert page.locator("main .cell").count() > 0 and page.locator("main .output").count() > 0
        assert page.problems == [], (step, page.problems)


def test_a_plot_renders_on_the_step_5_page(served, page):
    _, base = served
    page.goto(base)
    page.locator("nav.toc a", has_text="Step 5 —").first.click()
    page.wait_for_load_state("load")
    sizes = page.eval_on_selector_all(
        "main .output img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert any(done and w > 0 and h > 0 for done, w, h in sizes), sizes


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        url = attrs.get("href") if tag in ("a", "link") else attrs.get("src") if tag == "img" else None
        if url and not url.startswith(("data:", "mailto:")):
            self.links.append(url)


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_no_internal_link_is_broken(served):
    """Every page reachable from the landing page, every link, image and stylesheet on it, answers 200,
    and every #anchor exists on its page."""
    _, base = served
    pages: dict[str, _Links] = {}
    todo, checked, broken = [base], {}, []
    while todo:
        url = todo.pop()
        if url in pages:
            continue
        status, body = _fetch(url)
        assert status == 200, url
        pages[url] = parser = _Links()
        parser.feed(body.decode("utf-8"))
        for link in parser.links:
            target, _, anchor = urllib.parse.urljoin(url, link).partition("#")
            if not target.startswith(base):
                continue  # another site: not checked (offline)
            if target not in checked:
                checked[target] = _fetch(target)[0]
            if checked[target] != 200:
                broken.append(f"{url} -> {link} ({checked[target]})")
            elif target.endswith("/") and target not in pages:
                todo.append(target)
            if anchor:
                checked.setdefault((target, anchor), None)
    for target, anchor in [k for k in checked if isinstance(k, tuple)]:
        if anchor not in pages[target].ids:
            broken.append(f"#{anchor} is not on {target}")
    assert len(pages) >= 1 + 9 + 1, sorted(pages)  # the landing page, nine steps, the API reference at least
    assert broken == []


def test_building_the_site_records_nothing_in_the_builders_progress(served):
    """The notebooks' Ha and Ri cells write progress; the build's kernels write it inside the build folder."""
    assert BUILD["progress untouched"]
