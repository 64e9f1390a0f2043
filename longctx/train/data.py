"""Data: tokenizers, the on-disk token file, the synthetic demo corpus and the samplers.

Token file (named by a prefix P):
  P.bin       token ids, little-endian uint16 (vocab <= 65535) or uint32; documents
              concatenated, each followed by eos_id.
  P.docs.npy  int64 start offset of each document, ascending, first is 0.
  P.json      meta, written last: a token file exists only once P.json does.

Samplers are pure functions of (seed, step, micro, ranks): resuming at step s reproduces the
exact batches an uninterrupted run would have seen, with no iterator state to checkpoint.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from longctx.parallel.sharding import shard_batch, shard_ranges
from longctx.train.files import fsync_dir, sha256_file, write_tmp
import torch

from longctx.eval.passkey import passkey_sample

FORMAT = "longctx-tokens-v1"
IGNORE_INDEX = -100
_PREPARE_HINT = "create it with `longctx data prepare INPUT --out {prefix}`"
_CORRUPT_HINT = "re-run `longctx data prepare`"
_TEXT_SUFFIXES = (".txt", ".md")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>")


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus three specials (eos, pad, landmark)."""

    name = "byte"
    eos_id = 256  # document separator
    pad_id = 257
    landmark_id = 258  # reserved for landmark attention
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """text -> int64 (n_bytes,)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        """int (n,) -> text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        raw = bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8))
        return raw.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file behind the ByteTokenizer interface.

    vocab_size is the tokenizer's size + 1: the extra last id is reserved as landmark_id, so
    landmark attention never collides with a real token. pad_id is `<pad>` if the tokenizer
    has one, else eos_id (padded positions carry label -100, so their identity never trains).
    """

    def __init__(self, path: str):
        try:
            import tokenizers  # lazy: optional dependency
        except ImportError as e:
            raise ImportError(f"HFTokenizer({path!r}) needs the `tokenizers` package: "
                              f"pip install tokenizers (or use tokenizer 'byte')") from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} not found: pass a Hugging Face "
                                    f"tokenizer.json path or 'byte'")
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.path = path
        self.name = f"hf:{os.path.abspath(path)}"
        base = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(path)
        pad = self._tok.token_to_id("<pad>")
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.landmark_id = base
        self.vocab_size = base + 1

    def _find_eos(self, path: str) -> int:
        for name in _EOS_NAMES:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        raise ValueError(f"tokenizer {path!r} has none of the eos tokens {list(_EOS_NAMES)}: "
                         f"add one of them to the tokenizer or use tokenizer 'byte'")

    def encode(self, text: str) -> np.ndarray:
        """text -> int64 (n,), without added special tokens (documents get eos explicitly)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        """int (n,) -> text, special tokens (and the reserved landmark id) dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.landmark_id]
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str):
    """'byte' -> ByteTokenizer; anything else is a path to a Hugging Face tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer {spec!r} not found: use 'byte' or a path to a "
                                f"Hugging Face tokenizer.json")
    return HFTokenizer(spec)


def _as_tokenizer(tokenizer):
    """Accept a tokenizer object or a load_tokenizer spec string."""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


# --------------------------------------------------------------------------------------------
# Token file: writing
# --------------------------------------------------------------------------------------------


def _token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype holding ids < vocab_size."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def _paths(prefix: str) -> Tuple[str, str, str]:
    """(P.bin, P.docs.npy, P.json)."""
    return prefix + ".bin", prefix + ".docs.npy", prefix + ".json"


def _write_bin(f, docs: Iterable[np.ndarray], dtype: np.dtype, eos_id: int, vocab_size: int):
    """Stream documents into `f`; returns (doc_starts list, n_tokens, sha256 hex)."""
    sha, starts, n = hashlib.sha256(), [], 0
    eos = np.array([eos_id], dtype=np.int64)
    for ids in docs:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size}) while writing a token file: "
                             f"the tokenizer and its vocab_size disagree")
        buf = np.concatenate([ids, eos]).astype(dtype).tobytes()
        f.write(buf)
        sha.update(buf)
        starts.append(n)
        n += ids.size + 1
    return starts, n, sha.hexdigest()


def _write_token_file(prefix: str, docs: Iterable[np.ndarray], tokenizer) -> dict:
    """Write P.bin, P.docs.npy, P.json from tokenized documents; returns the meta.

    Everything goes to temporary files first; they are renamed into place with P.json last, so
    a reader that waits for P.json never sees a half-written token file.
    """
    bin_path, docs_path, json_path = _paths(prefix)
    dtype = _token_dtype(tokenizer.vocab_size)
    out = {}

    def write_bin(f):
        out["starts"], out["n"], out["sha"] = _write_bin(
            f, docs, dtype, tokenizer.eos_id, tokenizer.vocab_size)

    tmps = []
    try:
        tmps.append((write_tmp(bin_path, write_bin), bin_path))
        starts = np.asarray(out["starts"], dtype=np.int64)
        tmps.append((write_tmp(docs_path, lambda f: np.save(f, starts)), docs_path))
        meta = {
            "format": FORMAT, "dtype": dtype.name, "n_tokens": int(out["n"]),
            "n_docs": int(starts.size), "vocab_size": int(tokenizer.vocab_size),
            "tokenizer": tokenizer.name, "eos_id": int(tokenizer.eos_id), "sha256": out["sha"],
        }
        text = (json.dumps(meta, indent=2) + "\n").encode()
        tmps.append((write_tmp(json_path, lambda f: f.write(text)), json_path))
    except BaseException:
        for tmp, _ in tmps:
            os.remove(tmp)
        raise
    if os.path.exists(json_path):
        # Withdraw an old meta first: readers must not pair it with the new .bin mid-replace.
        os.remove(json_path)
    for tmp, final in tmps:  # json is last in the list
        os.replace(tmp, final)
    fsync_dir(json_path)
    return meta


def _find_inputs(inputs: Sequence[str]) -> List[str]:
    """Input files in order: each argument as given; directories expanded recursively to their
    *.txt / *.md files, sorted so the token file is deterministic."""
    files = []
    for item in inputs:
        if os.path.isfile(item):
            files.append(item)
        elif os.path.isdir(item):
            found = []
            for root, _, names in os.walk(item):
                found += [os.path.join(root, n) for n in names if n.endswith(_TEXT_SUFFIXES)]
            files += sorted(found)
        else:
            raise FileNotFoundError(f"input {item!r} not found: pass existing text files or "
                                    f"directories to `longctx data prepare`")
    return files


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"input {path!r} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                         f"convert it to UTF-8 or leave it out") from e


def prepare_token_file(inputs: List[str], out_prefix: str, tokenizer="byte", progress: bool = True,
                       overwrite: bool = False) -> dict:
    """Tokenize text files (one document each) into the token file `out_prefix`.

    `inputs`: files and/or directories (recursively *.txt, *.md). `tokenizer`: a spec string
    ('byte' or tokenizer.json path) or a tokenizer object. Returns the meta dict (= P.json).
    """
    from tqdm import tqdm

    tok = _as_tokenizer(tokenizer)
    files = _find_inputs(list(inputs))
    if not files:
        raise ValueError(f"no input files found in {list(inputs)}: pass text files or directories "
                         f"containing *.txt / *.md files")
    bin_path, _, json_path = _paths(out_prefix)
    for path in (bin_path, json_path):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"token file {path!r} already exists: pass overwrite=True "
                                  f"(`--overwrite`) to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    bar = tqdm(files, desc=f"tokenizing -> {out_prefix}", unit="file", disable=not progress)
    return _write_token_file(out_prefix, (tok.encode(_read_text(p)) for p in bar), tok)


# --------------------------------------------------------------------------------------------
# Token file: reading
# --------------------------------------------------------------------------------------------


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"token file {path!r} is corrupt ({why}): {_CORRUPT_HINT}")


def _load_meta(json_path: str) -> dict:
    """Parse and validate P.json."""
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(json_path, f"bad json: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _corrupt(json_path, f"format {got!r}, expected {FORMAT!r}")
    keys = ("dtype", "n_tokens", "n_docs", "vocab_size", "tokenizer", "eos_id", "sha256")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise _corrupt(json_path, f"missing keys {missing}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise _corrupt(json_path, f"dtype {meta['dtype']!r}, expected uint16 or uint32")
    return meta


def _load_doc_starts(docs_path: str, n_docs: int, n_tokens: int) -> np.ndarray:
    """Load and validate P.docs.npy: int64 (n_docs,), starts at 0, strictly ascending."""
    try:
        starts = np.load(docs_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(docs_path, f"unreadable: {e}") from e
    if starts.dtype != np.int64 or starts.ndim != 1 or starts.size != n_docs:
        raise _corrupt(docs_path, f"dtype {starts.dtype} shape {starts.shape}, expected int64 "
                                  f"({n_docs},)")
    if n_docs and (starts[0] != 0 or starts[-1] >= n_tokens or np.any(np.diff(starts) <= 0)):
        raise _corrupt(docs_path, "document starts not ascending from 0 within the tokens")
    return starts


class TokenFile:
    """Read-only view of a token file: memory-mapped tokens plus document starts.

    tokens: memmap (n_tokens,) uint16/uint32; doc_starts: int64 (n_docs,).
    """

    def __init__(self, prefix: str, verify: bool = False):
        self.prefix = prefix
        bin_path, docs_path, json_path = _paths(prefix)
        for path in (bin_path, docs_path, json_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"token file {path!r} not found: "
                                        + _PREPARE_HINT.format(prefix=prefix))
        self.meta = _load_meta(json_path)
        dtype = np.dtype("<u2" if self.meta["dtype"] == "uint16" else "<u4")
        n = int(self.meta["n_tokens"])
        size = os.path.getsize(bin_path)
        if size != n * dtype.itemsize:
            raise _corrupt(bin_path, f"{size} bytes, expected {n} tokens x {dtype.itemsize} = "
                                     f"{n * dtype.itemsize}")
        if verify and sha256_file(bin_path) != self.meta["sha256"]:
            raise _corrupt(bin_path, "sha256 mismatch")
        self.doc_starts = _load_doc_starts(docs_path, int(self.meta["n_docs"]), n)
        # np.memmap cannot map an empty file; an empty token file has no tokens to read anyway.
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if n
                       else np.zeros(0, dtype=dtype))

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64 (stop - start,); only that slice is read from disk."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"read({start}, {stop}) is outside the token file "
                             f"{self.prefix!r} of {self.n_tokens} tokens: use 0 <= start <= stop "
                             f"<= n_tokens")
        return np.array(self.tokens[start:stop], dtype=np.int64)

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Document index (into doc_starts) of each absolute token position, int64 like input."""
        return np.searchsorted(self.doc_starts, positions, side="right").astype(np.int64) - 1


# --------------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------------

# (singular, plural) nouns that can act; things and places; verbs as (3rd sing, base, past).
_AGENTS = [
    ("farmer", "farmers"), ("teacher", "teachers"), ("doctor", "doctors"), ("child", "children"),
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("fox", "foxes"),
    ("wolf", "wolves"), ("baker", "bakers"), ("sailor", "sailors"), ("king", "kings"),
    ("queen", "queens"), ("girl", "girls"), ("boy", "boys"), ("man", "men"), ("woman", "women"),
    ("student", "students"), ("soldier", "soldiers"), ("painter", "painters"),
    ("miller", "millers"), ("hunter", "hunters"), ("singer", "singers"), ("writer", "writers"),
    ("merchant", "merchants"), ("neighbor", "neighbors"), ("stranger", "strangers"),
    ("rabbit", "rabbits"), ("mouse", "mice"), ("goose", "geese"), ("sheep", "sheep"),
    ("guard", "guards"), ("cook", "cooks"), ("friend", "friends"), ("pilot", "pilots"),
]
_THINGS = [
    ("apple", "apples"), ("book", "books"), ("letter", "letters"), ("loaf", "loaves"),
    ("stone", "stones"), ("boat", "boats"), ("house", "houses"), ("key", "keys"),
    ("song", "songs"), ("story", "stories"), ("map", "maps"), ("lamp", "lamps"),
    ("coin", "coins"), ("box", "boxes"), ("basket", "baskets"), ("cup", "cups"),
    ("hat", "hats"), ("ring", "rings"), ("candle", "candles"), ("flower", "flowers"),
    ("chair", "chairs"), ("table", "tables"), ("wheel", "wheels"), ("rope", "ropes"),
    ("bottle", "bottles"), ("picture", "pictures"), ("garden", "gardens"), ("fence", "fences"),
    ("shoe", "shoes"), ("knife", "knives"), ("egg", "eggs"), ("fish", "fish"),
    ("window", "windows"), ("door", "doors"), ("bell", "bells"), ("coat", "coats"),
]
_PLACES = ["river", "mountain", "city", "village", "forest", "bridge", "market", "castle",
           "harbor", "field", "church", "school", "road", "lake", "hill", "farm", "mill",
           "tower", "station", "garden", "valley", "island", "shop", "well"]
_PREPS = ["near", "behind", "under", "across", "beside", "inside", "above", "past", "toward",
          "around", "beyond", "at"]
_ADJS = ["old", "young", "small", "big", "quiet", "happy", "red", "green", "brave", "tired",
         "clever", "kind", "strange", "little", "tall", "dark", "bright", "heavy", "gentle",
         "proud", "busy", "lazy", "wise", "cold", "warm", "blue", "yellow", "empty", "broken",
         "golden", "silent", "wild", "careful", "hungry", "lucky", "famous", "poor", "rich"]
_TVERBS = [
    ("sees", "see", "saw"), ("finds", "find", "found"), ("carries", "carry", "carried"),
    ("builds", "build", "built"), ("paints", "paint", "painted"), ("reads", "read", "read"),
    ("sells", "sell", "sold"), ("buys", "buy", "bought"), ("opens", "open", "opened"),
    ("loves", "love", "loved"), ("watches", "watch", "watched"), ("follows", "follow", "followed"),
    ("takes", "take", "took"), ("gives", "give", "gave"), ("brings", "bring", "brought"),
    ("holds", "hold", "held"), ("keeps", "keep", "kept"), ("wants", "want", "wanted"),
    ("cleans", "clean", "cleaned"), ("fixes", "fix", "fixed"), ("hides", "hide", "hid"),
    ("loses", "lose", "lost"), ("counts", "count", "counted"), ("draws", "draw", "drew"),
    ("remembers", "remember", "remembered"), ("needs", "need", "needed"),
]
_IVERBS = [
    ("sleeps", "sleep", "slept"), ("runs", "run", "ran"), ("sings", "sing", "sang"),
    ("waits", "wait", "waited"), ("laughs", "laugh", "laughed"), ("walks", "walk", "walked"),
    ("works", "work", "worked"), ("rests", "rest", "rested"), ("dances", "dance", "danced"),
    ("listens", "listen", "listened"), ("smiles", "smile", "smiled"), ("cries", "cry", "cried"),
    ("arrives", "arrive", "arrived"), ("leaves", "leave", "left"), ("plays", "play", "played"),
    ("speaks", "speak", "spoke"), ("stays", "stay", "stayed"), ("travels", "travel", "traveled"),
]
_TIMES = ["in the morning", "at night", "every day", "on monday", "on sunday", "in winter",
          "in summer", "after dinner", "before noon", "at dawn", "last week", "in the evening",
          "once a year", "at midnight", "on friday", "in spring"]
_NAMES = ["Anna", "Tom", "Mira", "Leo", "Clara", "Ben", "Nora", "Paul", "Ida", "Sam", "Eva",
          "Hugo", "Lena", "Max", "Rosa", "Otto", "Vera", "Karl", "Alma", "Finn"]
_NUMWORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve"]
_ADVS = ["slowly", "quickly", "quietly", "happily", "carefully", "often", "again", "together"]


class _Grammar:
    """A small probabilistic English grammar with number and tense agreement.

    Each paragraph has one tense (present or past) and a recurring named character, so the
    corpus has both local structure (word spelling, agreement) and paragraph-long dependencies.
    """

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self._r = self.rng.random

    def pick(self, items):
        return items[int(self._r() * len(items))]

    def noun_phrase(self, nouns, plural: bool) -> str:
        """'the old farmer', 'a dog', 'three red apples', '12 coins', 'her cat'."""
        noun = self.pick(nouns)[1 if plural else 0]
        adj = self.pick(_ADJS) + " " if self._r() < 0.4 else ""
        if plural:
            r = self._r()
            det = ("the" if r < 0.4 else self.pick(_NUMWORDS) if r < 0.7
                   else str(2 + int(self._r() * 98)) if r < 0.85 else "some")
        else:
            r = self._r()
            det = "the" if r < 0.5 else ("an" if (adj or noun)[0] in "aeiou" else "a") if r < 0.8 \
                else self.pick(["his", "her", "their", "one"])
        return f"{det} {adj}{noun}"

    def subject(self, name: str) -> Tuple[str, bool]:
        """(subject text, is_plural)."""
        r = self._r()
        if r < 0.25:
            return name, False
        if r < 0.35:
            return self.pick([("she", False), ("he", False), ("they", True)])
        plural = self._r() < 0.4
        return self.noun_phrase(_AGENTS, plural), plural

    def verb(self, verbs, plural: bool, past: bool) -> str:
        forms = self.pick(verbs)
        return forms[2] if past else forms[1] if plural else forms[0]

    def place(self) -> str:
        adj = self.pick(_ADJS) + " " if self._r() < 0.3 else ""
        return f"{self.pick(_PREPS)} the {adj}{self.pick(_PLACES)}"

    def clause(self, name: str, past: bool) -> str:
        """One subject-verb(-object) clause with optional place/time/adverb."""
        subj, plural = self.subject(name)
        if self._r() < 0.65:
            obj_plural = self._r() < 0.45
            obj = self.noun_phrase(_THINGS, obj_plural)
            text = f"{subj} {self.verb(_TVERBS, plural, past)} {obj}"
        else:
            text = f"{subj} {self.verb(_IVERBS, plural, past)}"
            if self._r() < 0.3:
                text += " " + self.pick(_ADVS)
        if self._r() < 0.4:
            text += " " + self.place()
        if self._r() < 0.2:
            text += " " + self.pick(_TIMES)
        return text

    def sentence(self, name: str, past: bool) -> str:
        r = self._r()
        if r < 0.45:
            body, end = self.clause(name, past), "."
        elif r < 0.6:
            body, end = f"{self.pick(_TIMES)}, {self.clause(name, past)}", "."
        elif r < 0.72:
            joiner = self.pick([" and ", ", but ", ", so ", " because "])
            body, end = self.clause(name, past) + joiner + self.clause(name, past), "."
        elif r < 0.8:
            body, end = self._question(name, past), "?"
        elif r < 0.9:
            body, end = self._there_is(past), "."
        else:
            said = "said" if past else "says"
            end = "!" if self._r() < 0.3 else "."
            body = f"{name} {said} that {self.clause(name, past)}"
        return body[0].upper() + body[1:] + end

    def _question(self, name: str, past: bool) -> str:
        subj, plural = self.subject(name)
        aux = "did" if past else "do" if plural else "does"
        return f"{aux} {subj} {self.pick(_TVERBS)[1]} {self.noun_phrase(_THINGS, self._r() < 0.5)}"

    def _there_is(self, past: bool) -> str:
        plural = self._r() < 0.5
        be = ("were" if plural else "was") if past else ("are" if plural else "is")
        return f"there {be} {self.noun_phrase(_THINGS, plural)} {self.place()}"

    def paragraph(self) -> str:
        """3..8 sentences sharing one tense and one named character."""
        name, past = self.pick(_NAMES), self._r() < 0.5
        n = 3 + int(self._r() * 6)
        return " ".join(self.sentence(name, past) for _ in range(n))


def _synthetic_paragraphs(seed: int) -> Iterator[str]:
    """Endless deterministic stream of paragraphs (ASCII, no newlines)."""
    grammar = _Grammar(seed)
    while True:
        yield grammar.paragraph()


def synthetic_text(seed: int, n_chars: int) -> str:
    """Exactly `n_chars` characters of the synthetic corpus for `seed` (ASCII, so bytes ==
    chars); paragraphs ("documents") are separated by blank lines. A shorter call is a prefix of
    a longer one with the same seed."""
    if n_chars < 0:
        raise ValueError(f"n_chars={n_chars} is negative: pass a length >= 0")
    parts, total = [], 0
    for para in _synthetic_paragraphs(seed):
        if total >= n_chars:
            break
        parts.append(para)
        total += len(para) + 2
    return "\n\n".join(parts)[:n_chars]


def _synthetic_docs(seed: int, n_tokens: int) -> Iterator[np.ndarray]:
    """Byte-token documents (paragraphs) whose total, with one eos each, is exactly n_tokens:
    the last paragraph is cut short so that the file still ends in eos."""
    tok, left = ByteTokenizer(), n_tokens
    for para in _synthetic_paragraphs(seed):
        if left <= 0:
            return
        ids = tok.encode(para)[: left - 1]
        left -= ids.size + 1
        yield ids


def default_cache_dir() -> str:
    """$LONGCTX_CACHE if set, else ~/.cache/longctx."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "longctx")
    return os.environ.get("LONGCTX_CACHE") or default


def ensure_synthetic_token_file(cache_dir: str, seed: int, n_tokens: int) -> str:
    """Return the prefix `cache_dir/synthetic-s{seed}-n{n_tokens}`, creating the token file once.

    Safe with many processes: creation happens under an exclusive flock, and a token file counts
    as present only once its .json (renamed into place last) exists.
    """
    if n_tokens < 2:
        raise ValueError(f"synthetic_tokens={n_tokens} is too small: use at least seq_len + 1")
    prefix = os.path.join(cache_dir, f"synthetic-s{seed}-n{n_tokens}")
    json_path = _paths(prefix)[2]
    if os.path.exists(json_path):
        return prefix
    os.makedirs(cache_dir, exist_ok=True)
    with open(prefix + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not os.path.exists(json_path):  # another process may have made it meanwhile
                _write_token_file(prefix, _synthetic_docs(seed, n_tokens), ByteTokenizer())
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return prefix


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def _check_rank(name: str, rank: int, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"{name}_rank={rank} with {name}_size={size} is invalid: "
                         f"use {name}_size >= 1 and 0 <= {name}_rank < {name}_size")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")


class _StepSampler:
    """Shared indexing and state for samplers that are pure functions of (seed, step)."""

    def __init__(self, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, sp_rank: int, sp_size: int, layout: str = "contiguous", ulysses: int = 1,
                 landmark_block: int = 0, landmark_id: int = -1):
        _check_positive("seq_len", seq_len)
        if landmark_block < 0 or (landmark_block and landmark_id < 0):
            raise ValueError(f"landmark_block={landmark_block}, landmark_id={landmark_id}: use a block >= 1 and "
                             f"the tokenizer's landmark id (or block 0 for no landmarks)")
        # Landmark layout: a landmark at every position p with p % (block + 1) == block.
        self.landmark_block, self.landmark_id = landmark_block, landmark_id
        _check_positive("micro_batch_size", micro_batch_size)
        _check_rank("dp", dp_rank, dp_size)
        _check_rank("sp", sp_rank, sp_size)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        # This SP rank's pieces of the (padded) window: parallel/sharding.py
        self.layout, self.ulysses = layout, ulysses
        self.ranges = shard_ranges(seq_len, sp_size, sp_rank, layout, ulysses)
        self.shard_len = sum(b - a for a, b in self.ranges)
        self.consumed_steps = 0

    @property
    def regular_len(self) -> int:
        """Regular (non-landmark) tokens among the seq_len positions of a window."""
        W = self.landmark_block + 1
        return self.seq_len - self.seq_len // W if self.landmark_block else self.seq_len

    def global_indices(self, step: int, micro: int = 0, grad_accum: int = 1) -> List[int]:
        """Global sample indices g of this dp rank's micro-batch (micro_batch_size,)."""
        if step < 0 or grad_accum < 1 or not 0 <= micro < grad_accum:
            raise ValueError(f"batch(step={step}, micro={micro}, grad_accum={grad_accum}) is "
                             f"invalid: use step >= 0 and 0 <= micro < grad_accum")
        mb = self.micro_batch_size
        base = (step * grad_accum + micro) * (mb * self.dp_size) + self.dp_rank * mb
        return [base + i for i in range(mb)]

    def advance(self, step: int) -> None:
        """Record that optimizer step `step` (0-based) finished: consumed_steps = step + 1."""
        if step < 0:
            raise ValueError(f"advance(step={step}): step must be >= 0")
        self.consumed_steps = step + 1

    def state_dict(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "consumed_steps": self.consumed_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("seq_len") != self.seq_len:
            raise ValueError(
                f"data sampler state has seed={state.get('seed')}, seq_len={state.get('seq_len')} "
                f"but this run has seed={self.seed}, seq_len={self.seq_len}: resume with the same "
                f"data.seed and data.seq_len, or start a fresh run")
        self.consumed_steps = int(state["consumed_steps"])


class PackedSampler(_StepSampler):
    """Packed windows of a token file; a deterministic function of (seed, step).

    The stream is cut into W = (n_tokens - 1) // seq_len windows of seq_len + 1 tokens starting
    at w * seq_len. Global sample g reads window perm_epoch[g % W] with epoch = g // W and
    perm_epoch = default_rng([seed, epoch]).permutation(W).
    """

    def __init__(self, token_file, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0, sp_size: int = 1,
                 layout: str = "contiguous", ulysses: int = 1, landmark_block: int = 0, landmark_id: int = -1):
        super().__init__(seq_len, micro_batch_size, seed, dp_rank, dp_size, sp_rank, sp_size, layout, ulysses,
                         landmark_block, landmark_id)
        self.token_file = TokenFile(token_file) if isinstance(token_file, str) else token_file
        n = self.token_file.n_tokens
        self.n_windows = (n - 1) // self.regular_len
        if self.n_windows < 1:
            raise ValueError(f"seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens "
                             f"but the token file has n_tokens={n}: use a shorter seq_len or "
                             f"more data")
        self._perms = {}  # epoch -> permutation; a micro-batch spans at most two epochs

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n_windows)
        return self._perms[epoch]

    def window(self, g: int) -> int:
        """Window index of global sample g."""
        epoch, idx = divmod(g, self.n_windows)
        return int(self._permutation(epoch)[idx])

    def windows(self, step: int, micro: int = 0, grad_accum: int = 1) -> List[int]:
        """Window index of each sample of this rank's micro-batch (micro_batch_size,)."""
        return [self.window(g) for g in self.global_indices(step, micro, grad_accum)]

    def _sample_landmark(self, window: int) -> Tuple[np.ndarray, ...]:
        """As _sample, with landmark tokens inserted: position p holds the landmark id when
        p % (block + 1) == block, else regular token r(p) = p - p // (block + 1) of the window.
        Landmarks are ordinary targets (the token before one predicts it); a landmark's
        document is its block's. Reads only the regular tokens this rank's pieces need."""
        T, W, tf = self.seq_len, self.landmark_block + 1, self.token_file
        start = window * self.regular_len
        pos = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges])
        nxt = pos + 1
        r_pos, r_nxt = pos - pos // W, nxt - nxt // W
        lo = int(np.minimum(r_pos, r_nxt).min())
        hi = int(min(np.maximum(r_pos, r_nxt).max(), self.regular_len)) + 1
        toks = tf.read(start + lo, start + hi).astype(np.int64)

        def at(p, r):
            reg = toks[np.clip(r - lo, 0, len(toks) - 1)]
            return np.where(p % W == self.landmark_block, self.landmark_id, reg)

        real = pos < T
        ids = np.where(real, at(pos, r_pos), tf.eos_id)
        labels = np.where(real, at(nxt, r_nxt), IGNORE_INDEX)
        d0 = tf.doc_index(np.int64(start))
        r_doc = np.clip(np.where(pos % W == self.landmark_block, r_pos - 1, r_pos), 0, self.regular_len - 1)
        doc = tf.doc_index(start + r_doc) - d0
        doc = np.where(real, doc, tf.doc_index(np.int64(start + self.regular_len - 1)) - d0 + 1)
        return ids, labels, pos, doc

    def _sample(self, window: int) -> Tuple[np.ndarray, ...]:
        """(input_ids, labels, positions, doc_ids), each int64 (shard_len,), for one window:
        this rank's pieces only (reads nothing else), padding past seq_len as sharding.py says."""
        if self.landmark_block:
            return self._sample_landmark(window)
        T, start = self.seq_len, window * self.seq_len
        tf = self.token_file
        ids, labels, pos = [], [], []
        for a, b in self.ranges:
            e = min(b, T)
            if e > a:
                x = tf.read(start + a, start + e + 1)  # piece plus one token for the last label
                ids.append(x[:-1].astype(np.int64))
                labels.append(x[1:].astype(np.int64))
            n_pad = b - max(a, e)
            if n_pad:
                ids.append(np.full(n_pad, tf.eos_id, dtype=np.int64))
                labels.append(np.full(n_pad, IGNORE_INDEX, dtype=np.int64))
            pos.append(np.arange(a, b, dtype=np.int64))
        pos = np.concatenate(pos)
        d0 = tf.doc_index(np.int64(start))
        doc = tf.doc_index(start + np.minimum(pos, T - 1)) - d0
        doc = np.where(pos < T, doc, tf.doc_index(np.int64(start + T - 1)) - d0 + 1)  # padding: its own document
        return np.concatenate(ids), np.concatenate(labels), pos, doc

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1) -> dict:
        """Tensors of shape (micro_batch_size, shard_len), all int64: input_ids, labels (next
        token), positions (inside the window), doc_ids (from 0 at the window start, +1 after
        each eos). shard_len = seq_len without SP, else this rank's share of the padded window."""
        samples = [self._sample(w) for w in self.windows(step, micro, grad_accum)]
        keys = ("input_ids", "labels", "positions", "doc_ids")
        return {k: torch.from_numpy(np.stack([s[j] for s in samples])) for j, k in enumerate(keys)}


class StreamSampler(_StepSampler):
    """Contiguous streams for truncated backpropagation through time (train.carry_state).

    The token file is cut into R = micro_batch_size x dp_size x grad_accum regions of
    region_len = (n_tokens - 1) // R tokens, one per global row; row r = (micro x dp_size +
    dp_rank) x micro_batch_size + i. At step s row r reads segment k = s % K of its region
    (K = region_len // seq_len), tokens [r·region_len + k·seq_len, +seq_len+1): row r's tokens at
    step s + 1 follow its tokens at step s, so the state a model carries over from step s is the
    state of the same stream. Positions count from the region start (k·seq_len + arange), so
    carried sliding-window keys sit before the segment's queries. Every K steps the regions start
    over (an epoch; `starts_stream` says when, and the trainer drops the carried state then),
    with the rows assigned to the regions in a new order (`regions`).
    Documents inside a region are not marked for the state: the model reads eos as any token.
    One SP rank only (carried state does not run sequence-parallel), no landmarks.
    """

    def __init__(self, token_file, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, grad_accum: int = 1):
        super().__init__(seq_len, micro_batch_size, seed, dp_rank, dp_size, 0, 1)
        _check_positive("grad_accum", grad_accum)
        self.grad_accum = grad_accum
        self.token_file = TokenFile(token_file) if isinstance(token_file, str) else token_file
        n = self.token_file.n_tokens
        self.rows = micro_batch_size * dp_size * grad_accum
        self.region_len = (n - 1) // self.rows
        self.segments = self.region_len // seq_len  # K: steps before the regions start over
        if self.segments < 1:
            raise ValueError(f"train.carry_state streams {self.rows} rows (data.micro_batch_size={micro_batch_size} x "
                             f"{dp_size} data-parallel ranks x train.grad_accum={grad_accum}) of at least "
                             f"data.seq_len={seq_len} tokens each, but the token file has n_tokens={n}: use fewer "
                             f"rows, a shorter seq_len or more data (at least {self.rows * seq_len + 1} tokens)")

    def starts_stream(self, step: int) -> bool:
        """Whether step `step` (0-based) reads the first segment of every region: no state to carry."""
        return step % self.segments == 0

    def row_starts(self, step: int, micro: int = 0, grad_accum: int = 1) -> List[int]:
        """First token of each row's segment at this step (micro_batch_size,)."""
        if grad_accum != self.grad_accum:
            raise ValueError(f"StreamSampler.batch(grad_accum={grad_accum}) but the streams were cut for "
                             f"grad_accum={self.grad_accum}")
        k = step % self.segments
        region = self.regions(step // self.segments)
        return [int(region[g % self.rows]) * self.region_len + k * self.seq_len
                for g in self.global_indices(step, micro, grad_accum)]

    def regions(self, epoch: int) -> np.ndarray:
        """Which region each global row streams in epoch `epoch` (rows,): the identity in epoch
        0, then a permutation drawn from (seed, epoch), so that rows (and the rows sharing a
        micro-batch) meet other streams each epoch; the carried state is dropped at every epoch
        start, so the change of stream is never carried across."""
        if epoch == 0:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.rows)

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1) -> dict:
        """Tensors (micro_batch_size, seq_len) int64: input_ids, labels (next token), positions
        (from the region start, the same for every row), doc_ids (from 0 at the segment start,
        +1 after each eos)."""
        T, tf = self.seq_len, self.token_file
        ids, labels, doc = [], [], []
        for start in self.row_starts(step, micro, grad_accum):
            x = tf.read(start, start + T + 1)
            ids.append(x[:-1])
            labels.append(x[1:])
            doc.append(tf.doc_index(start + np.arange(T, dtype=np.int64)) - tf.doc_index(np.int64(start)))
        pos = (step % self.segments) * T + np.arange(T, dtype=np.int64)
        out = {"input_ids": np.stack(ids), "labels": np.stack(labels),
               "positions": np.broadcast_to(pos, (len(ids), T)), "doc_ids": np.stack(doc)}
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in out.items()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stream_rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream_rows") != self.rows:
            raise ValueError(f"data sampler state has stream_rows={state.get('stream_rows')} but this run streams "
                             f"{self.rows} rows (micro_batch_size x data-parallel ranks x grad_accum): resume "
                             f"train.carry_state with the settings it was saved with")
        super().load_state_dict(state)


class PasskeySampler(_StepSampler):
    """Passkey-retrieval training samples; a deterministic function of (seed, step).

    Sample g uses rng = default_rng([seed, g]): depth ~ U[0, 1], then (min_len > 0 only) a
    length ~ U{min_len..regular tokens of the window}, then the key; a prompt + answer of at
    most that length (the window's by default), then eos, right-padded with pad_id. Only the
    answer and its eos carry labels, or every real token with targets='all' (landmarks and
    padding never do).
    """

    def __init__(self, tokenizer, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0, sp_size: int = 1,
                 layout: str = "contiguous", ulysses: int = 1, landmark_block: int = 0, landmark_id: int = -1,
                 targets: str = "answer", min_len: int = 0):
        super().__init__(seq_len, micro_batch_size, seed, dp_rank, dp_size, sp_rank, sp_size, layout, ulysses,
                         landmark_block, landmark_id)
        if targets not in ("answer", "all"):
            raise ValueError(f"data.passkey_targets={targets!r}: use 'answer' (the key only) or 'all' (every token)")
        self.tokenizer, self.targets = _as_tokenizer(tokenizer), targets
        self.min_len = int(min_len)
        if self.min_len:
            from longctx.eval.passkey import _n_tokens
            # the longest prompt without filler over keys of every digit count (a subword
            # tokenizer may split some keys into more tokens than others)
            need = max(_n_tokens(self.tokenizer, key, 0, 0.0)
                       for key in (9, 99, 999, 9999, 10000, 12345, 33333, 47981, 49999, 50000))
            if not need <= self.min_len <= self.regular_len:
                raise ValueError(f"data.passkey_min_len={self.min_len}: use 0 (every prompt fills the window) or "
                                 f"{need}..{self.regular_len} (the shortest prompt with this tokenizer .. the "
                                 f"window's {self.regular_len} regular tokens)")

    def sample(self, g: int) -> dict:
        """Sample g: input_ids, labels int64 (seq_len,), passkey, depth.

        The answer is followed by eos, a target too: the model learns where the key ends (with
        nothing after it, greedy decoding runs on into more digits and the key is misread)."""
        rng = np.random.default_rng([self.seed, g])
        depth = float(rng.uniform(0.0, 1.0))
        n = self.regular_len
        # drawn only when asked, so that min_len=0 keeps the samples of earlier runs
        used = int(rng.integers(self.min_len, n + 1)) if self.min_len else n
        s = passkey_sample(self.tokenizer, rng, used, depth)
        ids = np.full(n + 1, self.tokenizer.pad_id, dtype=np.int64)
        n_p, n_a = s["prompt_ids"].size, s["answer_ids"].size
        ids[:n_p], ids[n_p:n_p + n_a], ids[n_p + n_a] = s["prompt_ids"], s["answer_ids"], self.tokenizer.eos_id
        target = np.zeros(n + 1, dtype=bool)
        target[1 if self.targets == "all" else n_p:n_p + n_a + 1] = True  # the answer + eos (or every real token)
        if self.landmark_block:  # insert landmarks; they are never targets here
            W = self.landmark_block + 1
            p = np.arange(self.seq_len + 1)
            is_lm = p % W == self.landmark_block
            r = np.minimum(p - p // W, n)
            ids, target = np.where(is_lm, self.landmark_id, ids[r]), np.where(is_lm, False, target[r])
        # Position t predicts ids[t + 1]
        labels = np.where(target[1:], ids[1:], IGNORE_INDEX)
        return {"input_ids": ids[:-1], "labels": labels, "passkey": s["passkey"], "depth": depth}

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1) -> dict:
        """Tensors (micro_batch_size, shard_len) int64: input_ids, labels (-100 except the
        answer), positions (global arange), doc_ids (zeros); this SP rank's pieces."""
        samples = [self.sample(g) for g in self.global_indices(step, micro, grad_accum)]
        ids = np.stack([s["input_ids"] for s in samples])
        labels = np.stack([s["labels"] for s in samples])
        pos = np.broadcast_to(np.arange(self.seq_len, dtype=np.int64), ids.shape)
        out = {"input_ids": ids, "labels": labels, "positions": pos, "doc_ids": np.zeros_like(ids)}
        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        return shard_batch(out, self.sp_size, self.sp_rank, self.layout, self.ulysses)


class MixedSampler(_StepSampler):
    """Packed LM windows mixed with passkey samples; a deterministic function of (seed, step).

    Global sample g is a passkey sample (PasskeySampler.sample(g)) when
    default_rng([seed, g, 7]).random() < fraction, else packed window PackedSampler.window(g)
    (so the windows of the passkey draws are skipped, never shifted). Same tensors as the two
    samplers, per SP rank; doc_ids 0 for passkey rows. With landmarks, both are in the landmark
    layout. A model that must both model the corpus and retrieve the key trains on this
    (data.passkey_fraction)."""

    def __init__(self, packed: "PackedSampler", passkey: "PasskeySampler", fraction: float):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"data.passkey_fraction={fraction} must be in [0, 1] (the share of passkey samples)")
        same = ("seq_len", "micro_batch_size", "seed", "dp_rank", "dp_size", "sp_rank", "sp_size", "layout",
                "ulysses", "landmark_block", "landmark_id")
        diff = [k for k in same if getattr(packed, k) != getattr(passkey, k)]
        if diff:
            raise ValueError(f"MixedSampler: the packed and passkey samplers differ in {diff}")
        super().__init__(packed.seq_len, packed.micro_batch_size, packed.seed, packed.dp_rank, packed.dp_size,
                         packed.sp_rank, packed.sp_size, packed.layout, packed.ulysses, packed.landmark_block,
                         packed.landmark_id)
        self.packed, self.passkey, self.fraction = packed, passkey, float(fraction)
        self.token_file = packed.token_file

    def is_passkey(self, g: int) -> bool:
        """Whether global sample g is a passkey sample."""
        return bool(np.random.default_rng([self.seed, g, 7]).random() < self.fraction)

    def _passkey_shard(self, g: int) -> Tuple[np.ndarray, ...]:
        s = self.passkey.sample(g)
        full = {"input_ids": torch.from_numpy(s["input_ids"][None]), "labels": torch.from_numpy(s["labels"][None]),
                "positions": torch.arange(self.seq_len, dtype=torch.int64)[None],
                "doc_ids": torch.zeros(1, self.seq_len, dtype=torch.int64)}
        sh = shard_batch(full, self.sp_size, self.sp_rank, self.layout, self.ulysses)
        return tuple(sh[k][0].numpy() for k in ("input_ids", "labels", "positions", "doc_ids"))

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1) -> dict:
        """Tensors (micro_batch_size, shard_len) int64: input_ids, labels, positions, doc_ids."""
        samples = [self._passkey_shard(g) if self.is_passkey(g) else self.packed._sample(self.packed.window(g))
                   for g in self.global_indices(step, micro, grad_accum)]
        keys = ("input_ids", "labels", "positions", "doc_ids")
        return {k: torch.from_numpy(np.stack([np.asarray(s[j], dtype=np.int64) for s in samples]))
                for j, k in enumerate(keys)}


def make_sampler(data_cfg, tokenizer, dp_rank: int, dp_size: int, sp_rank: int, sp_size: int,
                 layout: str = "contiguous", ulysses: int = 1, landmark_block: int = 0,
                 stream: bool = False, grad_accum: int = 1):
    """Build the sampler for `data_cfg.kind`; returns (sampler, vocab_size_needed).

    `tokenizer` may be None, in which case data_cfg.tokenizer is loaded. layout / ulysses: how
    the sequence is split over the SP ranks (parallel/sharding.py). stream: contiguous streams
    for train.carry_state (StreamSampler, cut for `grad_accum` micro-batches per step) instead of
    shuffled windows.
    """
    tok = load_tokenizer(data_cfg.tokenizer) if tokenizer is None else _as_tokenizer(tokenizer)
    common = dict(seq_len=data_cfg.seq_len, micro_batch_size=data_cfg.micro_batch_size,
                  seed=data_cfg.seed, dp_rank=dp_rank, dp_size=dp_size, layout=layout, ulysses=ulysses,
                  landmark_block=landmark_block, landmark_id=tok.landmark_id if landmark_block else -1)
    kind = data_cfg.kind
    fraction = float(getattr(data_cfg, "passkey_fraction", 0.0) or 0.0)
    if fraction and kind not in ("tokens", "synthetic"):
        raise ValueError(f"data.passkey_fraction={fraction} mixes passkey samples into LM data: use it with "
                         f"data.kind=tokens or synthetic (data.kind={kind!r})")

    if stream:
        # config.validate_carry refuses these first; this names the sampler's own limits
        if kind not in ("tokens", "synthetic") or fraction or sp_size != 1 or landmark_block:
            raise ValueError(f"stream sampling (train.carry_state) reads data.kind=tokens or synthetic on one SP "
                             f"rank without passkey samples or landmarks; got data.kind={kind!r}, "
                             f"passkey_fraction={fraction}, sp_size={sp_size}, landmark_block={landmark_block}")

    def lm(token_file):
        if stream:
            return StreamSampler(token_file, data_cfg.seq_len, data_cfg.micro_batch_size, data_cfg.seed,
                                 dp_rank, dp_size, grad_accum), tok.vocab_size
        return mixed(PackedSampler(token_file, sp_rank=sp_rank, sp_size=sp_size, **common))

    def mixed(packed):
        if not fraction:
            return packed, tok.vocab_size
        pk = PasskeySampler(tok, sp_rank=sp_rank, sp_size=sp_size, targets=data_cfg.passkey_targets,
                            min_len=data_cfg.passkey_min_len, **common)
        return MixedSampler(packed, pk, fraction), tok.vocab_size

    if kind == "tokens":
        if not data_cfg.path:
            raise ValueError(f"data.path={data_cfg.path!r} but data.kind='tokens' needs a token "
                             f"file: set data.path=PREFIX made by `longctx data prepare`")
        tf = TokenFile(data_cfg.path)
        _check_tokenizer_matches(tf, tok)
        return lm(tf)
    if kind == "synthetic":
        if tok.name != "byte":
            raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} but data.kind='synthetic' "
                             f"is byte-level: set data.tokenizer=byte")
        cache = data_cfg.cache_dir or default_cache_dir()
        prefix = ensure_synthetic_token_file(cache, data_cfg.seed, data_cfg.synthetic_tokens)
        return lm(prefix)
    if kind == "passkey":
        return PasskeySampler(tok, sp_rank=sp_rank, sp_size=sp_size, targets=data_cfg.passkey_targets,
                              min_len=data_cfg.passkey_min_len, **common), tok.vocab_size
    raise ValueError(f"data.kind={kind!r} is unknown: use 'tokens', 'synthetic' or 'passkey'")


def _check_tokenizer_matches(tf: TokenFile, tok) -> None:
    """The run's tokenizer must be the one the token file was prepared with (same kind, vocab
    and eos; an HF tokenizer's path may differ, e.g. after copying the run elsewhere)."""
    same_kind = tf.meta["tokenizer"].split(":")[0] == tok.name.split(":")[0]
    if not same_kind or tf.eos_id != tok.eos_id or tf.vocab_size != tok.vocab_size:
        raise ValueError(
            f"token file {tf.prefix!r} was prepared with tokenizer {tf.meta['tokenizer']!r} "
            f"(vocab {tf.vocab_size}, eos {tf.eos_id}) but the run uses {tok.name!r} (vocab "
            f"{tok.vocab_size}, eos {tok.eos_id}): set data.tokenizer to the one used at prepare")
