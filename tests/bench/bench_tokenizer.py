#!/usr/bin/env python3
"""Tokenizer throughput of bnbfs-run on one core (issue 5: at least 20 MB/s
of text). Not a test; never gates CI.

    tests/bench/bench_tokenizer.py [--build BUILD] [--mb 16] [--runs 3]
                                   [--results tests/bench/RESULTS.md]

Corpora, built from files every Debian machine has (cached in .cache/bench/):
  multilingual  the translated strings of every gettext catalog under
                /usr/share/locale (~80 languages: Cyrillic, Greek, CJK,
                Arabic, Hebrew, Devanagari, Thai, Tamil, ...)
  english       their English originals plus /usr/share/common-licenses
  code          Python standard library sources and C headers
  mixed         documents of all three, shuffled
each cut to --mb MB (whole documents). For each, `bnbfs-run MODEL --tokenize`
runs pinned to one core (taskset) --runs times on the corpus and on empty
input; encode time = best(corpus) - best(empty) in CPU seconds (user + sys;
the empty run is the tokenizer.json load). The ids are checked against the
`tokenizers` library (one thread: RAYON_NUM_THREADS=1), whose encode CPU
time on the same core is reported beside. Prints a table and appends it to --results with the
machine, date and command.
"""
import argparse
import datetime
import gettext
import glob
import os
import pathlib
import platform
import random
import resource
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tokenizer_dir  # noqa: E402


def catalogs():
    """(original, translation) pairs of every readable .mo file, by language."""
    by_lang = {}
    for mo in sorted(glob.glob("/usr/share/locale/*/LC_MESSAGES/*.mo")):
        lang = mo.split("/")[4]
        try:
            with open(mo, "rb") as f:
                cat = gettext.GNUTranslations(f)._catalog
        except Exception:
            continue
        for k, v in cat.items():
            if isinstance(k, tuple):
                k = k[0]
            if k and v and isinstance(v, str):
                by_lang.setdefault(lang, []).append((k, v))
    return by_lang


def cut(docs, limit, seed):
    rng = random.Random(seed)
    rng.shuffle(docs)
    out, size = [], 0
    for d in docs:
        b = len(d.encode())
        if size + b > limit:
            continue
        out.append(d)
        size += b
        if size > limit * 0.999:
            break
    return "\n".join(out)


def build_corpora(limit):
    cat = catalogs()
    multi = ["\n".join(v for _, v in pairs[i:i + 20])
             for lang, pairs in cat.items() if not lang.startswith("en")
             for i in range(0, len(pairs), 20)]
    english = ["\n".join(k for k, _ in pairs[i:i + 20])
               for pairs in cat.values() for i in range(0, len(pairs), 20)]
    for p in glob.glob("/usr/share/common-licenses/*"):
        if os.path.isfile(p):
            english.append(pathlib.Path(p).read_text(errors="replace"))
    code = []
    pylib = pathlib.Path(os.__file__).parent
    for p in sorted(pylib.glob("*.py")) + sorted(pathlib.Path("/usr/include").rglob("*.h")):
        try:
            code.append(p.read_text())
        except (UnicodeDecodeError, OSError):
            pass
    corpora = {"multilingual": cut(multi, limit, 1), "english": cut(list(set(english)), limit, 2),
               "code": cut(code, limit, 3)}
    corpora["mixed"] = cut(multi + english + code, limit, 4)
    return corpora


def cpu_children():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd, data, runs):
    """Best CPU time (user + sys of the child) of `runs` runs: on a shared
    machine CPU time is steadier than wall time, and one core is pinned."""
    best = None
    out = None
    for _ in range(runs):
        t0 = cpu_children()
        r = subprocess.run(cmd, input=data, capture_output=True, check=True)
        dt = cpu_children() - t0
        best = dt if best is None else min(best, dt)
        out = r.stdout
    return best, out


REF = r"""
import sys, time
from tokenizers import Tokenizer
t = Tokenizer.from_file(sys.argv[1]); t.encode_special_tokens = True
text = open(sys.argv[2], encoding="utf-8", newline="").read()
t0 = time.process_time(); ids = t.encode(text, add_special_tokens=False).ids
dt = time.process_time() - t0
open(sys.argv[3], "w").write(" ".join(map(str, ids)) + "\n"); print(dt)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--mb", type=float, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--results", default=str(ROOT / "tests" / "bench" / "RESULTS.md"))
    a = ap.parse_args()
    exe = pathlib.Path(a.build) / "runner" / "bnbfs-run"
    if not exe.exists():
        sys.exit(f"{exe} not built")
    tok = tokenizer_dir()
    cache = ROOT / ".cache" / "bench" / "tokenizer"
    cache.mkdir(parents=True, exist_ok=True)
    limit = int(a.mb * 1e6)
    stamp = cache / f"corpora-{limit}.stamp"
    names = ["multilingual", "english", "code", "mixed"]
    if not stamp.exists():
        for n, text in build_corpora(limit).items():
            (cache / f"{n}.txt").write_text(text)
        stamp.write_text("ok")
    small = [n for n in names if (cache / f"{n}.txt").stat().st_size < limit // 2]
    if small:
        sys.exit(f"corpora {', '.join(small)} have less than half of {a.mb:g} MB: this machine "
                 "lacks their sources (/usr/share/locale/*/LC_MESSAGES/*.mo, "
                 "/usr/share/common-licenses); lower --mb or run where they exist")
    pin = ["taskset", "-c", str(a.core)] if shutil.which("taskset") else []
    cmd = pin + [str(exe), str(tok), "--tokenize"]
    t_load, _ = timed(cmd, b"", a.runs)
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for n in names:
        data = (cache / f"{n}.txt").read_bytes()
        t_all, out = timed(cmd, data, a.runs)
        ids = out.split()
        enc = max(t_all - t_load, 1e-9)
        ref_out = cache / f"{n}.ref.ids"
        r = subprocess.run(pin + [sys.executable, "-c", REF, str(tok / "tokenizer.json"),
                                  str(cache / f"{n}.txt"), str(ref_out)],
                           capture_output=True, text=True, check=True, env=env)
        t_ref = float(r.stdout.strip())
        same = ref_out.read_bytes().split() == ids
        rows.append((n, len(data) / 1e6, len(ids), len(data) / 1e6 / enc, len(data) / 1e6 / t_ref,
                     same))
        print(f"{n}: {len(data) / 1e6:.1f} MB, {len(ids)} ids, {len(data) / 1e6 / enc:.1f} MB/s "
              f"(tokenizers {len(data) / 1e6 / t_ref:.1f} MB/s), ids equal: {same}", flush=True)
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = [f"### Tokenizer throughput, one core ({date})", "",
             f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} cores. Command: "
             f"`tests/bench/bench_tokenizer.py --build {a.build} --mb {a.mb:g} --runs {a.runs}`. "
             f"Encode time = best of {a.runs} `taskset -c {a.core} bnbfs-run MODEL --tokenize` "
             f"in CPU seconds minus the same on empty input (tokenizer.json load: "
             f"{t_load:.2f} s).", "",
             "| corpus | MB | ids | bnbfs-run MB/s | tokenizers (1 thread) MB/s | ids equal |",
             "|---|---:|---:|---:|---:|---|"]
    for n, mb, nid, ours, ref, same in rows:
        table.append(f"| {n} | {mb:.1f} | {nid} | {ours:.1f} | {ref:.1f} | "
                     f"{'yes' if same else 'NO'} |")
    text = "\n".join(table) + "\n"
    print("\n" + text)
    with open(a.results, "a") as f:
        f.write("\n" + text)
    if not all(r[-1] for r in rows):
        sys.exit("ids differ from the tokenizers library")


if __name__ == "__main__":
    main()
