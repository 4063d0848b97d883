"""bnbfs-run's tokenizer against the `tokenizers` library on the real
gpt-oss tokenizer.json: the same ids for every text of a multilingual corpus
(English, code, whitespace runs, CRLF, numbers, contractions, accents,
Devanagari, Thai, Hebrew, Arabic, CJK, emoji with modifiers and ZWJ
sequences, special-token strings, long runs), a seeded random corpus mixing
all of them, and a 1 MB text; both the one-text (--tokenize) and the batch
(--tokenize -z) modes; detokenize(tokenize(x)) == x; invalid UTF-8 and bad ids
get one clear error line and a non-zero exit."""
import random
import subprocess

import pytest
from tokenizers import Tokenizer

from conftest import byte_level_map

SPECIAL_IN_TEXT = "<|start|>user<|message|>hi<|end|> <|endoftext|><|return|><|channel|>"

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It was the best of times, it "
               "was the worst of times; Mr. O'Neil paid $3.50 for 2 coffees (at 9:45am).",
    "code_python": "def f(x: int) -> list[int]:\n    \"\"\"Doc.\"\"\"\n    return [i ** 2 for i "
                   "in range(x) if i % 3 != 0]  # squares\n\nprint(f(10))\n",
    "code_c": "static int add(int *a, size_t n)\n{\n\tint s = 0;\n\tfor (size_t i = 0; i < n; "
              "i++)\n\t\ts += a[i];\n\treturn s >> 1; /* halve */\n}\n",
    "json": '{"name": "bnbfs", "version": [0, 1, 0], "nested": {"k": null, "ok": true}}',
    "whitespace": "a  b   c\t\td \t \n\n\n   \n x  \n\t\n   trailing   ",
    "crlf": "line one\r\nline two\r\n\r\n  indented\r\nlast\r",
    "numbers": "1 12 123 1234 12345 1234567890 3.14159 1,000,000 0x1F -42 +7 1e-9 2024-06-01 "
               "٣٤٥ ४२ 一二三 ²³",
    "contractions": "it's IT'S It'S they'll THEY'LL They'Ll we're WE'RE I'm I'M you'd YOU'D "
                    "we've WE'VE can't CAN'T 'tis 's 'T 'LL x'ſ ǅ'S",
    "accents": "café naïve résumé Ångström façade Zoë Dvořák São Paulo Øresund "
               "cafe\u0301 n\u0303o",
    "devanagari": "नमस्ते दुनिया, यह एक परीक्षण है। हिन्दी में लिखा गया वाक्य।",
    "thai": "สวัสดีชาวโลก นี่คือการทดสอบภาษาไทย ซึ่งไม่มีช่องว่างระหว่างคำ",
    "hebrew": "שלום עולם, זהו מבחן. עברית נכתבת מימין לשמאל.",
    "arabic": "مرحبا بالعالم، هذا اختبار. العربية تكتب من اليمين إلى اليسار.",
    "cjk": "你好，世界！这是一个测试。日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다.",
    "emoji": "hi 👋🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 coder 👩🏿‍💻 fire ❤️‍🔥 ok👍🏻👍🏿 🇫🇷🇯🇵 ©️ 1️⃣",
    "special_strings": SPECIAL_IN_TEXT,
    "unicode_spaces": "a\u00a0b\u2009c\u3000d\u0085e\u2028f\u2029g\u200bh\ufeffi\u180ej k\tl",
    "controls": "nul\x00byte bell\x07 esc\x1b[0m del\x7f",
    "mixed_scripts": "Hello мир κόσμε עולם 世界 ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 ﬁ Ⅻ",
    "punctuation": "!!! ??? ... --- *** ((( ))) \"quoted\" 'single' `tick` «guillemets» "
                   "— – … ¿¡ /path/to/file.txt\n//comment\n/* c */",
    "long_space_run": " " * 10000 + "x" + " " * 3000,
    "long_letter_run": "a" * 5000 + "B" * 700 + "é" * 300,
    "long_punct_run": "!" * 3000 + "\n" * 100 + "/" * 50,
    "long_digits": "9" * 1000,
    "empty": "",
    "single_space": " ",
    "single_newline": "\n",
}


@pytest.fixture(scope="module")
def ref(tokdir):
    t = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    # special-token strings inside text are plain text, as bnbfs-run encodes them
    t.encode_special_tokens = True
    return t


def ref_ids(ref, text):
    return ref.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def run(bin_path, tokdir):
    exe = str(bin_path("bnbfs-run"))

    def go(*args, stdin=b"", check=True):
        r = subprocess.run([exe, str(tokdir), *args], input=stdin, capture_output=True,
                           timeout=300)
        if check:
            assert r.returncode == 0, r.stderr.decode(errors="replace")
        return r
    return go


def tokenize_batch(run, texts):
    """All texts in one process: NUL-separated in, one line of ids each out."""
    data = b"\0".join(t.encode() for t in texts)
    out = run("--tokenize", "-z", stdin=data).stdout.decode()
    lines = out.split("\n")
    assert lines[-1] == ""
    return [[int(x) for x in ln.split()] for ln in lines[:-1]]


def random_corpus(n, seed):
    """Seeded random strings drawn from pieces of every script and class the
    regex distinguishes, glued with random separators."""
    rng = random.Random(seed)
    pieces = [v for k, v in CORPUS.items() if not k.startswith("long") and v]
    atoms = list("aAzZ09 \t\n\r'’sStTlLdDmMvVrReE.,!?-_/\\\"()[]{}<>|@#$%^&*+=~`:;") + [
        "ſ", "é", "ß", "Ω", "ж", "ע", "ب", "न", "्", "ก", "ั", "中", "カ", "한", "😀", "🏽",
        "\u200d", "\ufe0f", "\u00a0", "\u3000", "\u0085", "\u2028", "٣", "४", "²", "Ⅻ", "ǅ",
        "\u0301", "'s", "'LL", "'T", "<|end|>", "\r\n", "  ", "\n\n", "123456"]
    out = []
    for _ in range(n):
        k = rng.randint(0, 40)
        s = []
        for _ in range(k):
            if rng.random() < 0.15:
                p = rng.choice(pieces)
                a = rng.randint(0, len(p))
                s.append(p[a:a + rng.randint(1, 30)])
            else:
                s.append(rng.choice(atoms) * (1 if rng.random() < 0.8 else rng.randint(2, 9)))
        out.append("".join(s))
    return out


def megabyte_text():
    rng = random.Random(7)
    parts = [v for k, v in CORPUS.items() if v and not k.startswith("long")]
    buf, size = [], 0
    while size < 1 << 20:
        p = rng.choice(parts)
        buf.append(p)
        size += len(p.encode())
    return "".join(buf)


# One process per text costs a tokenizer load (~0.5 s); the batch test below
# covers every corpus entry, these cover the one-text mode.
@pytest.mark.parametrize("name", ["english", "code_python", "crlf", "contractions", "thai",
                                  "emoji", "unicode_spaces", "controls", "long_space_run",
                                  "empty"])
def test_one_text_matches_tokenizers(run, ref, name):
    text = CORPUS[name]
    out = run("--tokenize", stdin=text.encode()).stdout.decode()
    assert out.endswith("\n") and out.count("\n") == 1
    assert [int(x) for x in out.split()] == ref_ids(ref, text), name


def test_batch_mode_matches_tokenizers_on_corpus(run, ref):
    texts = [CORPUS[k] for k in sorted(CORPUS) if "\0" not in CORPUS[k]]
    got = tokenize_batch(run, texts)
    assert len(got) == len(texts)
    for t, g in zip(texts, got):
        assert g == ref_ids(ref, t), repr(t[:80])


def test_random_mixed_corpus_matches_tokenizers(run, ref):
    texts = [t for t in random_corpus(1500, seed=1234) if "\0" not in t]
    got = tokenize_batch(run, texts)
    bad = [t for t, g in zip(texts, got) if g != ref_ids(ref, t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"


def test_megabyte_text_matches_tokenizers(run, ref):
    text = megabyte_text()
    assert len(text.encode()) >= 1 << 20
    out = run("--tokenize", stdin=text.encode()).stdout.decode()
    assert [int(x) for x in out.split()] == ref_ids(ref, text)


def test_special_token_strings_are_plain_text(run, ref):
    out = run("--tokenize", stdin=SPECIAL_IN_TEXT.encode()).stdout.decode()
    ids = [int(x) for x in out.split()]
    assert all(i < 199998 for i in ids)       # no special ids produced from text
    ref.encode_special_tokens = False           # the other reading would split them out
    try:
        assert 200006 in ref_ids(ref, SPECIAL_IN_TEXT)
    finally:
        ref.encode_special_tokens = True


def test_round_trip_detokenize_tokenize(run):
    texts = [CORPUS[k] for k in sorted(CORPUS)] + random_corpus(200, seed=99)
    texts = [t for t in texts if "\0" not in t and t]
    ids = tokenize_batch(run, texts)
    data = "\n".join(" ".join(map(str, i)) for i in ids).encode() + b"\n"
    out = run("--detokenize", "-z", stdin=data).stdout
    back = out.split(b"\0")
    assert back[-1] == b""
    assert [b.decode() for b in back[:-1]] == texts


def test_round_trip_single_mode_keeps_nul_bytes(run):
    text = CORPUS["controls"]
    ids = run("--tokenize", stdin=text.encode()).stdout
    assert run("--detokenize", stdin=ids).stdout == text.encode()


def test_detokenize_gives_bytes_of_special_tokens_and_split_characters(run, ref):
    # <|start|> decodes to its text; one emoji split over byte tokens
    # decodes to exactly its bytes when all pieces are present
    assert run("--detokenize", stdin=b"200006 200008").stdout == b"<|start|><|message|>"
    ids = ref_ids(ref, "🏳️‍🌈")
    assert len(ids) > 1
    out = run("--detokenize", stdin=" ".join(map(str, ids)).encode()).stdout
    assert out == "🏳️‍🌈".encode()
    assert run("--detokenize", stdin=b"").stdout == b""


@pytest.mark.parametrize("data,offset", [(b"abc\xffdef", 3), (b"\xc3", 0),
                                         (b"ok \xed\xa0\x80 surrogate", 3),
                                         (b"overlong \xc0\xaf", 9), (b"\xf4\x90\x80\x80", 0)])
def test_invalid_utf8_is_a_clear_error(run, data, offset):
    r = run("--tokenize", stdin=data, check=False)
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    assert err.count("\n") == 1 and " error: " in err
    assert "invalid UTF-8" in err and f"offset {offset}" in err


def test_invalid_utf8_in_batch_names_the_record(run):
    r = run("--tokenize", "-z", stdin=b"fine\0also fine\0bad\xfe", check=False)
    assert r.returncode != 0
    assert "record 2" in r.stderr.decode() and "invalid UTF-8" in r.stderr.decode()


@pytest.mark.parametrize("data,what", [(b"1 2 999999", "999999"), (b"1 x 2", "byte 2"),
                                       (b"-5", "byte 0"), (b"99999999999", "out of range")])
def test_detokenize_rejects_bad_ids(run, data, what):
    r = run("--detokenize", stdin=data, check=False)
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    assert err.count("\n") == 1 and what in err


def test_ids_are_separated_by_one_space_on_one_line(run):
    out = run("--tokenize", stdin=b"Hello world").stdout
    assert out == b"13225 2375\n"
    assert run("--tokenize", stdin=b"").stdout == b"\n"


def test_missing_tokenizer_file_is_named(bin_path, tmp_path):
    r = subprocess.run([str(bin_path("bnbfs-run")), str(tmp_path), "--tokenize"],
                       input=b"x", capture_output=True)
    assert r.returncode != 0
    assert f"{tmp_path}/tokenizer.json" in r.stderr.decode()


def test_malformed_tokenizer_json_is_named(bin_path, tmp_path, tokdir):
    import json
    src = json.loads((tokdir / "tokenizer.json").read_text())
    cases = {
        "truncated": (tokdir / "tokenizer.json").read_text()[:5000],
        "normalizer": json.dumps({**src, "normalizer": {"type": "NFC"}}),
        "bad_merge": json.dumps({**src, "model": {**src["model"],
                                                  "merges": [["Ġ", "no-such-token"]]}}),
        "bad_regex": json.dumps({**src, "pre_tokenizer": {
            "type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}),
    }
    for name, text in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(text)
        r = subprocess.run([str(bin_path("bnbfs-run")), str(d), "--tokenize"], input=b"x",
                           capture_output=True)
        err = r.stderr.decode()
        assert r.returncode != 0, name
        assert "tokenizer.json" in err and " error: " in err, (name, err)
        assert err.count("\n") == 1, (name, err)


def test_merges_as_strings_give_the_same_ids(bin_path, tmp_path, tokdir, ref):
    """tokenizer.json may serialize merges as "a b" strings (older files)."""
    import json
    src = json.loads((tokdir / "tokenizer.json").read_text())
    src["model"]["merges"] = [" ".join(m) for m in src["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(src))
    text = CORPUS["english"] + CORPUS["cjk"] + CORPUS["long_letter_run"]
    r = subprocess.run([str(bin_path("bnbfs-run")), str(tmp_path), "--tokenize"],
                       input=text.encode(), capture_output=True, check=True)
    assert [int(x) for x in r.stdout.split()] == ref_ids(ref, text)


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_ignore_merges_on_a_small_vocab(bin_path, tmp_path, tokdir, ignore_merges):
    """The gpt-oss vocab never needs ignore_merges in practice (every whole
    pre-token in it is also what its merges build), so a small tokenizer
    where they differ checks the flag: "abc" is a token no merge builds."""
    import json
    bl = byte_level_map()
    vocab = {bl[b]: b for b in range(256)}
    for s in ["bc", "ab", "abc", "Ġa", "Ġab"]:
        vocab[s] = len(vocab)
    src = json.loads((tokdir / "tokenizer.json").read_text())
    src["model"] = {**src["model"], "vocab": vocab, "ignore_merges": ignore_merges,
                    "merges": [["b", "c"], ["a", "b"], ["Ġ", "a"], ["Ġa", "b"]]}
    src["added_tokens"] = []
    text = json.dumps(src)
    (tmp_path / "tokenizer.json").write_text(text)
    ref = Tokenizer.from_str(text)
    sample = "abc abc xabc abcabc ab bc aabbcc " + "abc" * 40
    r = subprocess.run([str(bin_path("bnbfs-run")), str(tmp_path), "--tokenize"],
                       input=sample.encode(), capture_output=True, check=True)
    got = [int(x) for x in r.stdout.split()]
    assert got == ref.encode(sample).ids
    assert (vocab["abc"] in got) == ignore_merges
