"""Rebuild the evaluation corpus from Debian and PyPI packages, and check the question set against it.

The corpus is real, freely licensed documentation in English, Chinese and Japanese (HTML,
plain text, PDF, reStructuredText, Markdown) taken from packages, so it is rebuilt on a fresh
machine instead of being committed. Nothing here runs at import; nothing touches the network
except ``apt-get download`` and ``pip download`` while building.

    python bench/eval_corpus.py                 # build bench/corpus/eval/ (needs apt-get, pip)
    python bench/eval_corpus.py --check         # every quote occurs in its file (and page); answers in quotes
    python bench/eval_corpus.py --list          # the files, their packages and licences
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "bench" / "corpus" / "eval"
QA_FILE = ROOT / "bench" / "eval" / "qa.jsonl"
LOCK_FILE = ROOT / "bench" / "eval" / "corpus.lock.json"

if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

_WS = re.compile(r"\s+")

HB = "usr/share/doc/debian-handbook/html"
REF = "usr/share/debian-reference"
POLICY = "usr/share/doc/debian-policy"
PYDOC = "usr/share/doc/python3.11/html/_sources"


@dataclass(frozen=True)
class Package:
    name: str
    version: str  # the version the question set was written against; another one only warns
    licence: str
    registry: str = "debian"  # or "pypi"


PACKAGES = {
    p.name: p
    for p in [
        Package("debian-handbook", "11.20220922", "GPL-2.0+ or CC-BY-SA-3.0"),
        Package("debian-reference-en", "2.100", "GPL-2.0+"),
        Package("debian-reference-zh-cn", "2.100", "GPL-2.0+"),
        Package("debian-history", "2.28", "GPL-2.0+"),
        Package("debian-faq-zh-cn", "11.1", "Debian FAQ licence (verbatim and modified copies permitted)"),
        Package("maint-guide-ja", "1.2.53", "GPL-2.0+"),
        Package("debian-policy", "4.6.2.0", "GPL-2.0+ (Policy); FHS licence (FHS 3.0)"),
        Package("python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0"),
        Package("rich", "15.0.0", "MIT", registry="pypi"),
    ]
}

# (package, path inside the package, path in the corpus). A ".gz" member is unpacked.
FILES: list[tuple[str, str, str]] = [
    # English
    ("debian-policy", f"{POLICY}/fhs/fhs-3.0.pdf.gz", "en/fhs-3.0.pdf"),
    ("debian-reference-en", f"{REF}/ch03.en.html", "en/debian-reference/ch03-system-initialization.en.html"),
    ("debian-reference-en", f"{REF}/ch08.en.html", "en/debian-reference/ch08-i18n-l10n.en.html"),
    ("debian-handbook", f"{HB}/en-US/sect.apparmor.html", "en/handbook/sect.apparmor.html"),
    ("debian-handbook", f"{HB}/en-US/sect.automatic-upgrades.html", "en/handbook/sect.automatic-upgrades.html"),
    ("debian-handbook", f"{HB}/en-US/sect.asynchronous-task-scheduling-anacron.html", "en/handbook/sect.anacron.html"),
    ("debian-handbook", f"{HB}/en-US/sect.http-ftp-proxy.html", "en/handbook/sect.http-ftp-proxy.html"),
    ("debian-handbook", f"{HB}/en-US/sect.network-diagnosis-tools.html", "en/handbook/sect.network-diagnosis-tools.html"),
    ("debian-history", "usr/share/doc/debian-history/constitution.txt.gz", "en/debian-constitution.txt"),
    ("debian-history", "usr/share/doc/debian-history/debian-manifesto.gz", "en/debian-manifesto.txt"),
    ("debian-policy", f"{POLICY}/policy.html/_sources/ch-docs.rst.txt", "en/policy/ch-docs.rst"),
    ("debian-policy", f"{POLICY}/policy.html/_sources/ch-scope.rst.txt", "en/policy/ch-scope.rst"),
    ("python3.11-doc", f"{PYDOC}/howto/sorting.rst.txt", "en/python/howto-sorting.rst"),
    ("python3.11-doc", f"{PYDOC}/howto/ipaddress.rst.txt", "en/python/howto-ipaddress.rst"),
    ("python3.11-doc", f"{PYDOC}/tutorial/venv.rst.txt", "en/python/tutorial-venv.rst"),
    ("python3.11-doc", f"{PYDOC}/faq/general.rst.txt", "en/python/faq-general.rst"),
    ("rich", "README.md", "en/rich-README.md"),
    # Chinese (Simplified)
    ("debian-faq-zh-cn", "usr/share/doc/debian/FAQ/debian-faq.zh-cn.txt.gz", "zh/debian-faq.zh-cn.txt"),
    ("debian-reference-zh-cn", f"{REF}/ch04.zh-cn.html", "zh/debian-reference/ch04-authentication.zh-cn.html"),
    ("debian-handbook", f"{HB}/zh-CN/sect.release-lifecycle.html", "zh/handbook/sect.release-lifecycle.html"),
    ("debian-handbook", f"{HB}/zh-CN/sect.syslog.html", "zh/handbook/sect.syslog.html"),
    ("debian-handbook", f"{HB}/zh-CN/sect.backup.html", "zh/handbook/sect.backup.html"),
    ("debian-handbook", f"{HB}/zh-CN/sect.task-scheduling-cron-atd.html", "zh/handbook/sect.task-scheduling-cron-atd.html"),
    # Japanese
    ("maint-guide-ja", "usr/share/doc/maint-guide-ja/maint-guide.ja.pdf", "ja/maint-guide.ja.pdf"),
    ("debian-history", "usr/share/doc/debian-history/docs/detailed.ja.html", "ja/debian-history.ja.html"),
    ("debian-handbook", f"{HB}/ja-JP/sect.dhcp.html", "ja/handbook/sect.dhcp.html"),
    ("debian-handbook", f"{HB}/ja-JP/sect.why-debian.html", "ja/handbook/sect.why-debian.html"),
    ("debian-handbook", f"{HB}/ja-JP/sect.creating-accounts.html", "ja/handbook/sect.creating-accounts.html"),
    ("debian-handbook", f"{HB}/ja-JP/sect.quotas.html", "ja/handbook/sect.quotas.html"),
]


# --------------------------------------------------------------------------------------- build


def _fetch_debian(pkg: Package, workdir: Path) -> Path:
    """Download and unpack one .deb into a folder (never installs anything)."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    out = workdir / "x" / pkg.name
    if out.is_dir():
        return out
    for spec in (f"{pkg.name}={pkg.version}", pkg.name):
        done = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True, text=True)
        if done.returncode == 0:
            break
        print(f"  apt-get download {spec} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    else:
        raise SystemExit(f"cannot download {pkg.name}: run 'apt-get update' first (Debian bookworm)")
    deb = sorted(debs.glob(f"{pkg.name}_*.deb"))[-1]
    if pkg.version not in deb.name.replace("%3a", ":"):
        print(f"  warning: {deb.name} is not version {pkg.version}; quotes may no longer match", file=sys.stderr)
    out.mkdir(parents=True)
    subprocess.run(["dpkg", "-x", str(deb), str(out)], check=True)
    return out


def _fetch_pypi(pkg: Package, workdir: Path) -> Path:
    """Download a source distribution with pip (no install) and unpack it."""
    dl = workdir / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    out = workdir / "x" / pkg.name
    if out.is_dir():
        return out
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl), f"{pkg.name}=={pkg.version}"]
    subprocess.run(cmd, check=True, capture_output=True)
    archive = sorted(dl.glob(f"{pkg.name}-{pkg.version}.tar.gz"))[-1]
    out.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        top = f"{pkg.name}-{pkg.version}/"
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(top):
                member.name = member.name[len(top):]
                tar.extract(member, out, filter="data")
    return out


def build(corpus: Path = CORPUS, keep: Path | None = None) -> dict:
    """Fetch every package, copy the chosen files into ``corpus``; return the lock (sha256 per file)."""
    corpus.mkdir(parents=True, exist_ok=True)
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="eval-corpus-"))
    lock: dict[str, dict] = {}
    try:
        unpacked: dict[str, Path] = {}
        for name, member, dest in FILES:
            pkg = PACKAGES[name]
            if name not in unpacked:
                print(f"fetching {name} {pkg.version} ({pkg.registry})")
                fetch = _fetch_pypi if pkg.registry == "pypi" else _fetch_debian
                unpacked[name] = fetch(pkg, workdir)
            src = unpacked[name] / member
            target = corpus / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            data = src.read_bytes()
            if member.endswith(".gz"):
                data = gzip.decompress(data)
            target.write_bytes(data)
            lock[dest] = {"package": name, "version": pkg.version, "licence": pkg.licence, "member": member,
                          "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return lock


def compare_lock(lock: dict) -> list[str]:
    if not LOCK_FILE.is_file():
        return []
    expected = json.loads(LOCK_FILE.read_text(encoding="utf-8"))
    return [f"{path}: differs from the file the questions were written against"
            for path, entry in lock.items() if path in expected and expected[path]["sha256"] != entry["sha256"]]


# ---------------------------------------------------------------------------------------- text


def extract_pages(path: Path) -> list[tuple[int | None, str]]:
    """The text of a file as (page, text) pieces: the real loader when it exists, else a simple one.

    Using ``ingest.load.load_file`` keeps the quotes honest against what localgpt really indexes.
    """
    try:
        from ingest.load import load_file
    except ImportError:
        return _simple_extract(path)
    doc = load_file(path, ocr=False)
    pages: dict[int | None, list[str]] = {}
    for el in doc.elements:
        pages.setdefault(el.page, []).append(el.text)
    return [(page, "\n".join(parts)) for page, parts in pages.items()]


def _simple_extract(path: Path) -> list[tuple[int | None, str]]:
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        from pypdf import PdfReader

        reader = PdfReader(str(path))
        return [(i + 1, page.extract_text() or "") for i, page in enumerate(reader.pages)]
    if suffix in (".html", ".htm"):
        import warnings

        from bs4 import BeautifulSoup, XMLParsedAsHTMLWarning

        warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning)  # the handbook is XHTML
        soup = BeautifulSoup(path.read_bytes(), "lxml")
        for tag in soup(["script", "style"]):
            tag.decompose()
        return [(None, soup.get_text("\n"))]
    return [(None, path.read_text(encoding="utf-8", errors="replace"))]


# --------------------------------------------------------------------------------------- check


def check(qa_file: Path = QA_FILE, corpus: Path = CORPUS) -> list[str]:
    """Problems with the question set: a quote not in its file (or page), an answer not in its quote."""
    from localgpt.evaluation import answer_in_text, load_qa, normalize_for_match

    problems: list[str] = []
    cases = load_qa(qa_file)
    cache: dict[str, list[tuple[int | None, str]]] = {}
    for case in cases:
        where = f"{qa_file.name}:{case.line} ({case.id})"
        if not case.answerable:
            continue
        if not case.quote:
            problems.append(f"{where}: answerable question without a quote")
            continue
        path = corpus / case.source
        if not path.is_file():
            problems.append(f"{where}: source {case.source} is not in the corpus (build it first)")
            continue
        if case.source not in cache:
            cache[case.source] = [(p, normalize_for_match(t)) for p, t in extract_pages(path)]
        quote = normalize_for_match(case.quote)
        found_on = [p for p, t in cache[case.source] if quote in t]
        if not found_on:  # PDF text may lose or gain spaces between words: compare without whitespace
            bare = _WS.sub("", quote)
            found_on = [p for p, t in cache[case.source] if bare in _WS.sub("", t)]
        if not found_on:
            problems.append(f"{where}: quote not found in {case.source}: {case.quote[:70]!r}")
        elif case.page is not None and case.page not in found_on:
            problems.append(f"{where}: quote is on page(s) {found_on} of {case.source}, not page {case.page}")
        if not answer_in_text(case.answers, case.quote):
            problems.append(f"{where}: neither the answer nor an alias occurs in the quote")
    return problems


def summary(qa_file: Path = QA_FILE) -> str:
    from localgpt.evaluation import load_qa

    cases = load_qa(qa_file)
    by_lang: dict[str, int] = {}
    for c in cases:
        by_lang[c.lang] = by_lang.get(c.lang, 0) + 1
    cross = sum(1 for c in cases if c.answerable and c.cross_language)
    unans = sum(1 for c in cases if not c.answerable)
    files = len({c.source for c in cases if c.answerable})
    langs = ", ".join(f"{k} {v}" for k, v in sorted(by_lang.items()))
    return (f"{len(cases)} questions ({langs}); {len(cases) - unans} answerable over {files} files, "
            f"{unans} unanswerable, {cross} cross-language")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="where the corpus lives (default bench/corpus/eval)")
    parser.add_argument("--qa", type=Path, default=QA_FILE, help="question file to check")
    parser.add_argument("--check", action="store_true", help="check the question set against the corpus")
    parser.add_argument("--list", action="store_true", help="list files, packages and licences")
    parser.add_argument("--keep", type=Path, help="keep downloaded packages in this folder (reused next time)")
    parser.add_argument("--write-lock", action="store_true", help="record the built files' sha256 in bench/eval/corpus.lock.json")
    args = parser.parse_args(argv)

    if args.list:
        for name, member, dest in FILES:
            pkg = PACKAGES[name]
            print(f"{dest:58} {pkg.registry}:{name} {pkg.version}  [{pkg.licence}]")
        return 0
    if args.check:
        if not args.corpus.is_dir():
            print(f"no corpus at {args.corpus}: run 'python bench/eval_corpus.py' first", file=sys.stderr)
            return 2
        problems = check(args.qa, args.corpus)
        for p in problems:
            print(p)
        print(summary(args.qa))
        print("OK: every quote occurs in its file and holds its answer" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0

    lock = build(args.corpus, args.keep)
    total = sum(e["bytes"] for e in lock.values())
    print(f"{len(lock)} files, {total / 1e6:.1f} MB in {args.corpus}")
    for problem in compare_lock(lock):
        print(f"warning: {problem}", file=sys.stderr)
    if args.write_lock:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        LOCK_FILE.write_text(json.dumps(lock, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
