"""The course as a static website (cross-cutting: imports no step module when imported).

* :func:`build_site` — ``course site build``: stage the README (the landing page), the nine notebooks
  executed in the ``tiny`` profile, ``docs/instructor-guide.md`` and an API reference of ``course_lib``,
  let Jupyter Book 2 (MyST) turn them into JSON pages (``jupyter-book build --site``), render those as
  HTML, and move the finished site into place in one rename.
* :func:`write_api_pages` — one Markdown page per ``course_lib`` module, from its docstrings (``inspect``).
* :func:`render_site` — MyST's JSON pages (``_build/site``) as static HTML pages, with a navigation bar.
* :func:`make_server` — ``course site serve``: an HTTP server for a built site (``http.server``).

Why a renderer of our own: MyST's default theme (``book-theme``) is not a PyPI or npm package; MyST
downloads it from GitHub at build time, which an offline classroom cannot do. The site template in
``site/theme/`` is local, and MyST never starts it: this module writes the HTML from MyST's JSON.
"""

from __future__ import annotations

import html
import http.server
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from .checks import integer
from .paths import course_root, writable_problem

__all__ = ["build_site", "write_api_pages", "render_site", "make_server", "default_out", "MARKER"]

#: The file that marks a folder as a site this module built: a rebuild may replace such a folder whole.
MARKER = ".course-site"
_STEPS = range(1, 10)
_GUIDE_ENTRY = "    - pattern: docs/instructor-guide.md\n"  # the line of site/myst.yml that adds the guide


def default_out(root: Path | None = None) -> Path:
    """``build/site`` in the course folder (``build/`` is ignored by git)."""
    return (course_root() if root is None else Path(root)) / "build" / "site"


# --------------------------------------------------------------------------------------------- build


def build_site(out: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None,
               profile: str = "tiny", log: Callable[[str], object] = print) -> Path:
    """Build the course website into ``out`` and return its path.

    Args:
        out: the folder to build into (default ``build/site`` in the course folder). It must be new, empty,
            or a site built earlier (it holds :data:`MARKER`), which is then replaced whole.
        root: the course folder (default: the one this command runs in).
        profile: the profile the notebooks are executed in (default ``tiny``, a few minutes in all).
        log: called with each progress line (default ``print``).

    Everything is built in a temporary folder beside ``out`` and renamed into place at the end, so a
    failed build leaves ``out`` as it was.

    Raises:
        ValueError: ``out`` holds other files, is a file, or cannot be written.
        RuntimeError: a notebook fails, or ``jupyter-book`` is missing or fails (the message says why).
    """
    if profile not in ("tiny", "cpu", "gpu"):
        raise ValueError(f"profile must be tiny, cpu or gpu, got {profile!r}")
    root = course_root() if root is None else Path(root)
    out = default_out(root) if out is None else Path(out).expanduser().absolute()
    _check_out(out)
    _find_jupyter_book()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        src = staging / "src"
        _stage_sources(root, src, profile, log)
        log("MyST: jupyter-book build --site ...")
        _run_myst(src)
        html_dir = staging / "html"
        pages = render_site(src / "_build" / "site", html_dir, css=root / "site" / "theme" / "style.css", log=log)
        log(f"rendered {len(pages)} pages")
        _replace(html_dir, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"site built in {out} (course site serve --dir {out})")
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; give a folder for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"out {out} holds other files and is not a site built earlier; "
                         "give a new or empty folder (nothing there is replaced)")
    problem = writable_problem(out.parent)
    if problem is not None:
        raise ValueError(f"out: the folder {out.parent} {problem}; give a folder you can write")


def _find_jupyter_book() -> None:
    if importlib.util.find_spec("jupyter_book") is None:
        raise RuntimeError('jupyter-book is not installed: pip install -e ".[dev]" (it brings jupyter-book 2)')
    if shutil.which("node") is None:
        raise RuntimeError("Jupyter Book 2 needs Node.js 18 or later on the PATH: install it "
                           "(apt-get install nodejs, or https://nodejs.org) and build again")


def _stage_sources(root: Path, src: Path, profile: str, log: Callable[[str], object]) -> None:
    """Copy ``site/`` and the README into ``src``, execute the notebooks there, add the guide and the API."""
    from .notebook_runner import run_notebook

    shutil.copytree(root / "site", src)
    shutil.copy2(root / "README.md", src / "README.md")
    guide = root / "docs" / "instructor-guide.md"
    if guide.is_file():  # with the files it links to (docs/timings/)
        shutil.copytree(root / "docs", src / "docs", ignore=shutil.ignore_patterns(".*", "__pycache__"))
    else:  # a TOC pattern that matches nothing is an error line in MyST's output: leave it out
        log("note: docs/instructor-guide.md does not exist yet; the site is built without it")
        config = src / "myst.yml"
        config.write_text(config.read_text(encoding="utf-8").replace(_GUIDE_ENTRY, ""), encoding="utf-8")
    for step in _STEPS:
        log(f"executing notebook {step} of 9 ({profile} profile) ...")
        with _kernel_env(src / "progress.json"):
            result = run_notebook(step, profile, out_dir=src / "notebooks", root=root)
        if result.error:
            raise RuntimeError(f"notebook {step} ({result.notebook.name}) failed in the {profile} profile, so the "
                               f"site was not built; its executed copy showed: {result.error.splitlines()[-1]}")
        log(f"  {result.notebook.name}: {result.seconds:.0f} s")
    log(f"API reference: {len(write_api_pages(src / 'api'))} modules")


@contextmanager
def _kernel_env(progress_file: Path):
    """What the notebooks' kernels see while the site is built: figures drawn into the notebook
    (``MPLBACKEND=Agg``, set for tests and CI, would hide them), and the Ha and Ri cells' records
    written to ``progress_file`` in the build folder, never the builder's own progress record."""
    change = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "COURSE_PROGRESS_FILE": str(progress_file)}
    saved = {k: os.environ.get(k) for k in change}
    os.environ.update(change)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_myst(src: Path) -> None:
    env = {**os.environ, "JB_ALLOW_NODEENV": "0"}
    proc = subprocess.run([sys.executable, "-m", "jupyter_book", "build", "--site"], cwd=src, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (src / "_build" / "site" / "config.json").is_file():
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise RuntimeError(f"jupyter-book build --site failed (exit status {proc.returncode}):\n{tail}")


def _replace(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out`` by renaming; an earlier site there goes only once ``new`` is in place."""
    (new / MARKER).write_text("built by `course site build`; a rebuild replaces this folder\n", encoding="utf-8")
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old.{os.getpid()}")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(new, out)
        return
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- API


def write_api_pages(dest: str | os.PathLike, package: str = "course_lib") -> list[Path]:
    """Write ``dest/reference.md`` (the list of modules) and one page per module of ``package``, from its docstrings.

    Each module page has the module's docstring, then every public name (``__all__``, else every name
    without a leading underscore defined in the module) with its signature and docstring; a class lists
    its public methods too. Imports the modules (so step code, and torch, is imported).

    Returns:
        The module pages written, sorted by module name.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    top = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.walk_packages(top.__path__, package + ".")
                               if not m.name.rsplit(".", 1)[-1].startswith("_"))
    pages = []
    for name in names:
        module = importlib.import_module(name)
        page = dest / f"{name}.md"
        page.write_text(_module_page(module), encoding="utf-8")
        pages.append(page)
    index = ["# API reference", "", *_doc_block(inspect.getdoc(top)), "One page per module, from its docstrings:", ""]
    index += [f"- [`{p.stem}`]({p.name}) — {_summary(importlib.import_module(p.stem))}" for p in pages]
    (dest / "reference.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    return pages


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__]
    return [n for n in names if hasattr(module, n)]


def _module_page(module) -> str:
    lines = [f"# `{module.__name__}`", "", *_doc_block(inspect.getdoc(module))]
    for name in _public_names(module):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            lines += [f"## class `{name}`", "", *_signature(name, obj), *_doc_block(inspect.getdoc(obj))]
            for meth_name, meth in vars(obj).items():
                if meth_name.startswith("_") or not callable(meth):
                    continue
                lines += [f"### `{name}.{meth_name}`", "", *_signature(meth_name, meth),
                          *_doc_block(inspect.getdoc(meth))]
        elif callable(obj):
            lines += [f"## `{name}`", "", *_signature(name, obj), *_doc_block(inspect.getdoc(obj))]
        else:
            lines += [f"## `{name}`", "", "```text", _safe_repr(obj), "```", ""]
    return "\n".join(lines) + "\n"


def _signature(name: str, obj) -> list[str]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    # Annotations are strings here (``from __future__ import annotations``): show them unquoted.
    params = [p.replace(annotation=_Annotation(p.annotation)) if isinstance(p.annotation, str) else p
              for p in sig.parameters.values()]
    ret = sig.return_annotation
    sig = sig.replace(parameters=params, return_annotation=_Annotation(ret) if isinstance(ret, str) else ret)
    return ["```python", f"{name}{sig}", "```", ""]


class _Annotation(str):
    """A string annotation that ``inspect`` prints without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _doc_block(doc: str | None) -> list[str]:
    """A docstring: its first paragraph as text, the rest as written (preformatted), as ``help()`` shows it."""
    if not doc:
        return []
    first, _, rest = doc.strip().partition("\n\n")
    lines = [_markdown_text(" ".join(first.split())), ""]
    if rest.strip():
        lines += ["```text", rest.rstrip(), "```", ""]
    return lines


def _summary(module) -> str:
    doc = inspect.getdoc(module) or ""
    return _markdown_text(" ".join(doc.strip().partition("\n\n")[0].split())[:200])


def _markdown_text(text: str) -> str:
    """Plain docstring text as Markdown: ``x`` becomes `x`, and Markdown's special characters outside code
    stay literal."""
    parts = re.split(r"(``?[^`]+``?)", text)
    out = []
    for part in parts:
        if part.startswith("`"):
            out.append("`" + part.strip("`") + "`")
        else:
            out.append(re.sub(r"([\\*_\[\]<>{}#|~$])", r"\\\1", part))
    return "".join(out)


def _safe_repr(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 300 else text[:300] + " ..."


# ------------------------------------------------------------------------------------------- render


def render_site(site: str | os.PathLike, out: str | os.PathLike, css: str | os.PathLike | None = None,
                log: Callable[[str], object] = print) -> list[str]:
    """Render MyST's JSON site (``_build/site`` of ``jupyter-book build --site``) as static HTML in ``out``.

    The first page of the table of contents becomes ``out/index.html``, every other page
    ``out/<slug>/index.html``; MyST's files (images of notebook outputs, downloads) are copied to ``out``,
    ``css`` to ``out/style.css``. Every link is relative, so the site works from any folder of a server.
    A relative link MyST could not resolve (to a folder, or a file outside the site) is shown as text, and
    ``log`` is told.

    Returns:
        The slugs rendered, the landing page's first.
    """
    site, out = Path(site), Path(out)
    config = json.loads((site / "config.json").read_text(encoding="utf-8"))
    project = config["projects"][0]
    nav = [{"slug": project["index"], "title": None, "level": 1}] + list(project["pages"])
    slugs = [e["slug"] for e in nav if e.get("slug")]
    out.mkdir(parents=True, exist_ok=True)
    if (site / "public").is_dir():
        shutil.copytree(site / "public", out, dirs_exist_ok=True)
    if css is not None:
        shutil.copy2(css, out / "style.css")
    site_title = config.get("title") or project.get("title", "")
    for i, slug in enumerate(slugs):
        page = json.loads((site / "content" / f"{slug}.json").read_text(encoding="utf-8"))
        depth = 0 if i == 0 else 1
        renderer = _Renderer(depth, landing=slugs[0])
        body = renderer.render(page["mdast"])
        for url in renderer.unresolved:
            log(f"note: page {slug} links to {url}, which is not in the site; shown as text")
        neighbours = (slugs[i - 1] if i else None, slugs[i + 1] if i + 1 < len(slugs) else None)
        text = _page_html(page, body, nav, slug, site_title, depth, slugs[0], neighbours)
        target = out / "index.html" if depth == 0 else out / slug / "index.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return slugs


def _rel(url: str, depth: int, landing: str) -> str:
    """A site path (``/slug``, ``/slug#x``, ``/file.png``) as a link relative to a page ``depth`` folders down."""
    if not url.startswith("/") or url.startswith("//"):
        return url
    path, hash_, frag = url.partition("#")
    path = path.strip("/")
    up = "../" * depth
    if path in ("", landing):
        target = up or "./"
    elif "." in path.rsplit("/", 1)[-1]:
        target = up + path
    else:
        target = up + path + "/"
    return target + (hash_ + frag if hash_ else "")


def _page_html(page: dict, body: str, nav: list[dict], slug: str, site_title: str, depth: int,
               landing: str, neighbours: tuple[str | None, str | None]) -> str:
    esc = html.escape
    title = page["frontmatter"].get("title") or site_title
    titles = {e["slug"]: e.get("title") or site_title for e in nav if e.get("slug")}
    items = []
    for e in nav[1:]:
        if not e.get("slug"):
            items.append(f'<li class="group">{esc(e.get("title") or "")}</li>')
            continue
        current = ' aria-current="page"' if e["slug"] == slug else ""
        items.append(f'<li class="level-{min(e.get("level", 1), 2)}"><a href="{_rel("/" + e["slug"], depth, landing)}"'
                     f'{current}>{esc(e.get("title") or e["slug"])}</a></li>')
    downloads = [f'<a href="{_rel(x["url"], depth, landing)}" download>{esc(x.get("filename", "source"))}</a>'
                 for x in page["frontmatter"].get("exports", []) if x.get("url", "").endswith(".ipynb")]
    pager = []
    for label, other in zip(("&larr; ", ""), neighbours):
        if other is None:
            pager.append("<span></span>")
        else:
            arrow = (label, "") if label else ("", " &rarr;")
            pager.append(f'<a href="{_rel("/" + other, depth, landing)}">{arrow[0]}{esc(titles[other])}{arrow[1]}</a>')
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)} — {esc(site_title)}</title>" if title != site_title else f"<title>{esc(title)}</title>",
        '<link rel="icon" href="data:,">', f'<link rel="stylesheet" href="{"../" * depth}style.css">', "</head>",
        "<body>", '<nav class="toc" aria-label="Course">',
        f'<a class="site-title" href="{_rel("/", depth, landing)}">{esc(site_title)}</a>',
        "<ul>", *items, "</ul>", "</nav>", "<main>", "<article>",
        *([f"<h1>{esc(title)}</h1>"] if not page["frontmatter"].get("content_includes_title", False) else []),
        *([f'<p class="downloads">Download the executed notebook: {" ".join(downloads)}</p>'] if downloads else []),
        body, "</article>", f'<footer class="pager">{"".join(pager)}</footer>', "</main>", "</body>", "</html>", ""])


def _plain_text(node: dict) -> str:
    return node.get("value", "") + "".join(_plain_text(c) for c in node.get("children") or [])


def _github_anchor(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_INLINE = {"strong": "strong", "emphasis": "em", "underline": "u", "superscript": "sup", "subscript": "sub",
           "delete": "del", "abbreviation": "abbr", "caption": "figcaption", "blockquote": "blockquote",
           "thematicBreak": "hr", "break": "br", "paragraph": "p", "listItem": "li"}


class _Renderer:
    """MyST's mdast (the JSON page's ``mdast``) as HTML; an unknown node shows its children."""

    def __init__(self, depth: int, landing: str):
        self.depth, self.landing = depth, landing
        self.unresolved: list[str] = []

    def render(self, node: dict) -> str:
        method = getattr(self, "_" + node.get("type", ""), None)
        if method is not None:
            return method(node)
        tag = _INLINE.get(node.get("type"))
        if tag in ("hr", "br"):
            return f"<{tag}>"
        inner = self.children(node)
        return f"<{tag}>{inner}</{tag}>" if tag else inner

    def children(self, node: dict) -> str:
        return "".join(self.render(c) for c in node.get("children") or [])

    def _text(self, node):
        return html.escape(node.get("value", ""))

    def _html(self, node):  # raw HTML written in a Markdown page
        return node.get("value", "")

    def _heading(self, node):
        level = min(max(int(node.get("depth", 2)), 1), 6)
        ident = node.get("html_id") or node.get("identifier")
        attr = f' id="{html.escape(ident)}"' if ident else ""
        github = _github_anchor(_plain_text(node))  # the README's and the guide's links use GitHub's anchors
        extra = f'<span id="{html.escape(github)}"></span>' if github and github != ident else ""
        return f"<h{level}{attr}>{extra}{self.children(node)}</h{level}>"

    def _inlineCode(self, node):
        return f"<code>{html.escape(node.get('value', ''))}</code>"

    def _code(self, node, cls="source"):
        lang = node.get("lang") or ""
        attr = f' class="language-{html.escape(lang)}"' if lang else ""
        return f'<pre class="{cls}"><code{attr}>{html.escape(node.get("value", ""))}</code></pre>'

    def _math(self, node):
        return f'<div class="math">{node["html"]}</div>' if node.get("html") else self._code(node, "math")

    def _inlineMath(self, node):
        return node.get("html") or f"<code>{html.escape(node.get('value', ''))}</code>"

    def _list(self, node):
        if node.get("ordered"):
            start = node.get("start")
            return f'<ol{f" start={int(start)}" if start not in (None, 1) else ""}>{self.children(node)}</ol>'
        return f"<ul>{self.children(node)}</ul>"

    def _link(self, node):
        url = node.get("url", "")
        if not url.startswith(("/", "#")) and not re.match(r"[a-z][a-z0-9+.-]*:", url):
            # a relative link MyST could not resolve (a folder, a file outside the site): text, not a 404
            self.unresolved.append(url)
            return f'<span class="unresolved-link" title="{html.escape(url)}">{self.children(node)}</span>'
        href = _rel(url, self.depth, self.landing)
        return f'<a href="{html.escape(href)}">{self.children(node)}</a>'

    def _crossReference(self, node):
        target = node.get("url") or ""
        ident = node.get("html_id") or node.get("identifier") or ""
        href = _rel(target, self.depth, self.landing) if target else ""
        href = href.split("#")[0] + (f"#{ident}" if ident else "")
        return f'<a href="{html.escape(href)}">{self.children(node)}</a>'

    def _image(self, node):
        src = _rel(node.get("url", ""), self.depth, self.landing)
        return f'<img src="{html.escape(src)}" alt="{html.escape(node.get("alt", ""))}">'

    def _table(self, node):
        return f"<table>{self.children(node)}</table>"

    def _tableRow(self, node):
        return f"<tr>{self.children(node)}</tr>"

    def _tableCell(self, node):
        tag = "th" if node.get("header") else "td"
        return f"<{tag}>{self.children(node)}</{tag}>"

    def _block(self, node):
        if node.get("kind") == "notebook-code":
            return f'<div class="cell">{self.children(node)}</div>'
        return self.children(node)

    def _admonition(self, node):
        return f'<aside class="admonition {html.escape(node.get("kind", "note"))}">{self.children(node)}</aside>'

    def _comment(self, node):
        return ""

    def _outputs(self, node):
        return f'<div class="output">{self.children(node)}</div>'

    def _output(self, node):
        data = node.get("jupyter_data") or {}
        kind = data.get("output_type")
        if kind == "stream":
            return f'<pre class="stream">{html.escape(_ANSI.sub("", data.get("text", "")))}</pre>'
        if kind == "error":
            trace = "\n".join(data.get("traceback") or [f"{data.get('ename')}: {data.get('evalue')}"])
            return f'<pre class="error">{html.escape(_ANSI.sub("", trace))}</pre>'
        return self._rich(data.get("data") or {})

    def _rich(self, bundle: dict) -> str:
        """The richest form of a display: an image, HTML, else plain text; a widget (a progress bar) shows nothing."""
        if "application/vnd.jupyter.widget-view+json" in bundle:
            return ""
        for mime in ("image/png", "image/jpeg", "image/gif", "image/svg+xml"):
            if mime in bundle:
                item = bundle[mime]
                if item.get("path"):
                    src = _rel(item["path"], self.depth, self.landing)
                else:
                    src = f"data:{mime};base64,{item.get('content', '')}"
                return f'<img src="{html.escape(src)}" alt="a figure the cell drew">'
        if "text/html" in bundle:
            return f'<div class="html-output">{bundle["text/html"].get("content", "")}</div>'
        if "text/plain" in bundle:
            return f'<pre>{html.escape(_ANSI.sub("", bundle["text/plain"].get("content", "")))}</pre>'
        return ""


# -------------------------------------------------------------------------------------------- serve


def make_server(folder: str | os.PathLike, host: str = "127.0.0.1",
                port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the built site in ``folder``, bound but not yet serving (call ``serve_forever``).

    Args:
        folder: a site built by :func:`build_site`.
        host: the address to listen on (default ``127.0.0.1``: this machine only).
        port: 0-65535 (default 8000; 0 picks a free port: read it from ``server.server_address``).

    Raises:
        ValueError: ``folder`` holds no built site, or ``port`` is out of range.
        OSError: the port is taken.
    """
    port = integer("port", port, minimum=0)
    if port > 65535:
        raise ValueError(f"port must be at most 65535, got {port}")
    folder = Path(folder).expanduser()
    if not (folder / "index.html").is_file():
        raise ValueError(f"{folder} holds no built site (no index.html); build it first: course site build")
    handler = partial(_QuietHandler, directory=str(folder))
    return http.server.ThreadingHTTPServer((host, port), handler)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature of the method it replaces
        pass
