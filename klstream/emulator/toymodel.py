"""A deterministic, seeded toy language model with its own tokenizer.

The emulator needs a "Model 2" whose exact next-token distribution tests can
recompute locally, so every number the server reports is checkable. The model
is pure numpy: the distribution of the next token is a fixed function of the
prompt and the last two context tokens, shaped to look like an LLM's (a
Zipf-like prior over words, some steps very peaked, others flat).

Tokenizer. The vocabulary is *prefix-closed* (every prefix of a token is also a
token) and ``encode`` is greedy longest match. For a prefix-closed vocabulary a
token sequence is exactly what greedy longest match produces from its text iff
no token ``t`` is followed by a token starting with a character ``c`` such that
``t + c`` is itself a token (greedy would have extended ``t``). The model gives
such continuations probability zero, so everything it samples re-tokenizes to
the same ids. Characters outside the vocabulary encode to *fallback ids*
``VOCAB_SIZE + ord(char)``; they round-trip through ``decode`` but the model
never predicts them. Token 0 is end-of-sequence, with empty text.

Variants. ``ToyModel.for_name`` parses the model name (the naming scheme is
documented in ``klstream.emulator``): ``d<x>`` adds ``x`` times a fixed
per-context Gaussian direction to the base logits (``s<n>`` picks the
direction). With the direction fixed, KL(base || variant) is non-decreasing in
``x`` in every context: the derivative of ``KL(p || p e^{x g} / Z)`` in ``x``
is ``E_{p_x}[g] - E_p[g] >= 0``.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

EOS_ID = 0
"""The end-of-sequence token: its text is empty, sampling it ends the response."""

THINKING_PREFIX = "(thinking) "
"""What thought tokens are conditioned on ahead of the prompt, so they differ from answers."""

MASKED_LOGPROB = -1000.0
"""Log-probability of tokens the model can never emit in a context.

Finite, so KL sums never meet ``inf - inf``, yet ``exp`` underflows to exactly 0.
"""

_WORD_TEXT = """
the of and to a in is it you that he was for on are with as his they be at one
have this from or had by not word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give
our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set
three want air well also play small end put home read hand large spell add even
land here must big high such follow act why ask men change went light kind off
need house picture try us again animal point mother world near build self earth
father model token language probability answer question because should between
example different important really data text value result distribution city
capital river country sun moon blue red green tree cat dog
"""
_WORDS = _WORD_TEXT.split()

_CAPITALIZED_TEXT = """
The It This In I A We You He She They There What How When If But And So My Yes
No Hello Paris France Model Answer Question Example
"""
_CAPITALIZED = _CAPITALIZED_TEXT.split()

_FRAGMENTS = ["ing", "ed", "ly", "er", "'s", "n't", "'re", "'ll", "'ve", "\n\n", "...", "--", "**"]

_SINGLE_CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + list("éèàüöä—–’‘“”…€£°")


def _build_vocab() -> list[str]:
    """The prefix-closed vocabulary; index = token id, index 0 is EOS."""
    wanted = set(_SINGLE_CHARS) | set(_FRAGMENTS)
    for word in [*_WORDS, *_CAPITALIZED]:
        wanted.update((word, " " + word))
    closed = {w[:i] for w in wanted for i in range(1, len(w) + 1)}
    return ["", *sorted(closed, key=lambda s: (len(s), s))]


VOCAB: tuple[str, ...] = tuple(_build_vocab())
VOCAB_SIZE = len(VOCAB)
TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB) if i != EOS_ID}


_Trie = dict[str, "_Trie"]
"""A character trie: each character maps to the subtrie of the tokens continuing with it."""


def _trie_pattern(tokens: Sequence[str]) -> str:
    """A regex matching the longest token at a position.

    In a prefix-closed set every trie node is a token, so a greedy descent of
    nested optional groups never backtracks and stops at the longest match.
    """
    trie: _Trie = {}
    for tok in tokens:
        node = trie
        for ch in tok:
            node = node.setdefault(ch, {})

    def alternatives(node: _Trie) -> list[str]:
        out = []
        for ch in sorted(node):
            sub = alternatives(node[ch])
            out.append(re.escape(ch) + (f"(?:{'|'.join(sub)})?" if sub else ""))
        return out

    return "|".join([*alternatives(trie), "(?s:.)"])


_TOKEN_RE = re.compile(_trie_pattern(VOCAB[1:]))
# No token has a space after its first character, so greedy matching starts a
# token at every space: text splits into space-led chunks that tokenize
# independently, and the chunks of real text repeat enough to cache.
assert not any(" " in tok[1:] for tok in VOCAB)
_CHUNK_RE = re.compile(r"[^ ]+| [^ ]*")
_CHUNK_CACHE: dict[str, list[int]] = {}
_CHUNK_CACHE_SIZE = 100_000
_CHUNK_CACHE_MAX_LEN = 64


def _encode_chunk(chunk: str) -> list[int]:
    get = TOKEN_IDS.get
    ids = [get(piece, VOCAB_SIZE + ord(piece[0])) for piece in _TOKEN_RE.findall(chunk)]
    if len(chunk) <= _CHUNK_CACHE_MAX_LEN:
        if len(_CHUNK_CACHE) >= _CHUNK_CACHE_SIZE:
            _CHUNK_CACHE.clear()
        _CHUNK_CACHE[chunk] = ids
    return ids


def encode(text: str) -> list[int]:
    """Greedy longest-match token ids of ``text``; unknown chars get fallback ids."""
    ids: list[int] = []
    cache = _CHUNK_CACHE
    for chunk in _CHUNK_RE.findall(text):
        ids += cache.get(chunk) or _encode_chunk(chunk)
    return ids


def token_str(token_id: int) -> str:
    """The text of one token id (vocabulary or fallback)."""
    if 0 <= token_id < VOCAB_SIZE:
        return VOCAB[token_id]
    if VOCAB_SIZE <= token_id <= VOCAB_SIZE + 0x10FFFF:
        return chr(token_id - VOCAB_SIZE)
    raise ValueError(f"token id {token_id} is out of range")


def decode(ids: Sequence[int]) -> str:
    """The concatenated text of ``ids``; the inverse of ``encode``."""
    return "".join(token_str(i) for i in ids)


def _forbidden_followers() -> list[np.ndarray]:
    """Per token id, the ids that must not follow it (their first char extends it)."""
    first_char = np.array([ord(tok[0]) if tok else -1 for tok in VOCAB])
    chars = [tok for tok in VOCAB if len(tok) == 1]
    out = []
    for tok in VOCAB:
        extending = [ord(c) for c in chars if tok and tok + c in TOKEN_IDS]
        out.append(np.flatnonzero(np.isin(first_char, extending)))
    return out


_FORBIDDEN = _forbidden_followers()
_NO_IDS = np.zeros(0, dtype=np.int64)


def _prior_logits() -> np.ndarray:
    """Context-free log-frequencies: Zipf over words, word fragments rare."""
    rank = {w: r for r, w in enumerate([*_WORDS, *_CAPITALIZED], start=2)}
    prior = np.full(VOCAB_SIZE, -9.0)  # prefixes of words, like "th" or " wat"
    for i, tok in enumerate(VOCAB):
        word = tok.removeprefix(" ")
        if i == EOS_ID:
            prior[i] = -5.0
        elif word in rank:
            zipf = -1.1 * np.log(rank[word])
            spaced = tok.startswith(" ")
            prior[i] = zipf + (0.0 if spaced else -1.5 if word[0].isupper() else -3.5)
        elif tok in _FRAGMENTS:
            prior[i] = -5.0
        elif len(tok) == 1:
            prior[i] = -2.0 if tok in ".,\n" else -6.0
    return prior


_PRIOR = _prior_logits()
_SENTENCE_END = frozenset(i for i, tok in enumerate(VOCAB) if tok and tok[-1] in ".!?\n")
_CAPITAL = np.array([tok.lstrip(" ")[:1].isupper() for tok in VOCAB])

# Shape of the distributions (tuned for a median entropy around 1 nat).
_SIGMA = 2.2
_P_CONFIDENT = 0.45
_CONFIDENT_BOOST = 7.0
_DIAL_SCALE = 1.5

_NOISE_ROWS = 512
# Tiled twice along the vocabulary axis so a rotated row is a slice (a view).
_NOISE_TABLE = np.tile(
    np.random.default_rng(20240611).standard_normal((_NOISE_ROWS, VOCAB_SIZE)), 2
)


def _noise(h: int) -> np.ndarray:
    """A standard-normal vector over the vocabulary, a fixed function of ``h``.

    Adds two rotated rows of a precomputed table: a few µs, where seeding a
    generator and drawing ``VOCAB_SIZE`` normals takes 30 µs.
    """
    i, j = h % _NOISE_ROWS, (h >> 9) % _NOISE_ROWS
    a, b = (h >> 18) % VOCAB_SIZE, (h >> 36) % VOCAB_SIZE
    row_a = _NOISE_TABLE[i, a : a + VOCAB_SIZE]
    row_b = _NOISE_TABLE[j, b : b + VOCAB_SIZE]
    return (row_a + row_b) * 0.7071067811865476


def _stable_hash(*parts: object) -> int:
    """A 128-bit hash stable across processes (``hash()`` is salted per process)."""
    data = "\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


@lru_cache(maxsize=4096)
def _prompt_hash(prompt: str) -> int:
    return _stable_hash("prompt", prompt)


class Candidate(NamedTuple):
    """One token with the model's (temperature-1) log-probability for it."""

    token: str
    token_id: int
    logprob: float


class Step(NamedTuple):
    """One decoding step: the emitted token and the top-k alternatives."""

    chosen: Candidate
    top: list[Candidate]


class Generation(NamedTuple):
    """A sampled continuation; ``finish_reason`` is ``STOP`` or ``MAX_TOKENS``.

    When the model stops, the EOS step (token ``""``) is kept as the last step,
    so a one-token scoring request always gets a top-k list.
    """

    steps: list[Step]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(step.chosen.token for step in self.steps)

    @property
    def token_ids(self) -> list[int]:
        """The emitted ids without a final EOS: ``encode(self.text)`` gives these back."""
        return [s.chosen.token_id for s in self.steps if s.chosen.token_id != EOS_ID]


def top_k(logprobs: np.ndarray, k: int) -> list[Candidate]:
    """The ``k`` most likely tokens, best first (ties broken by lower id)."""
    size = len(logprobs)
    k = min(k, size)
    if k <= 0:
        return []
    idx = np.argpartition(logprobs, size - k)[size - k :]
    idx.sort()
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [
        Candidate(VOCAB[i], i, lp)
        for i, lp in zip(idx.tolist(), logprobs[idx].tolist(), strict=True)
    ]


_NAME_DIAL = re.compile(r"d(\d+(?:\.\d+)?)")
_NAME_SEED = re.compile(r"s(\d+)")
_NAME_MUST_THINK = re.compile(r"mustthink(\d+)")
FLAGS = frozenset(
    {
        "thinking",
        "noprefill",
        "nologprobs",
        "logprobsoff",
        "sentinels",
        "padded",
        "rerouted",
        "retired",
    }
)
"""Name parts that select a server behaviour (``klstream.emulator`` describes each)."""
BASE_MODEL = "toy"


class UnknownModelError(ValueError):
    """The model name does not belong to the toy family."""


class ToyModel:
    """A named toy model: base distribution, optional perturbation, behaviour flags."""

    _CACHE_SIZE = 2048

    def __init__(
        self,
        name: str = "toy",
        dial: float = 0.0,
        perturb_seed: int = 0,
        *,
        flags: frozenset[str] = frozenset(),
        min_thinking_budget: int | None = None,
    ) -> None:
        if dial < 0:
            raise ValueError("dial must be >= 0")
        unknown = flags - FLAGS
        if unknown:
            raise ValueError(f"unknown behaviour flags {sorted(unknown)}")
        self.name = name
        self.dial = dial
        self.perturb_seed = perturb_seed
        self.thinking = "thinking" in flags or min_thinking_budget is not None
        self.noprefill = "noprefill" in flags
        self.nologprobs = "nologprobs" in flags
        self.min_thinking_budget = min_thinking_budget
        """The least thinking budget accepted (``mustthink<N>``): thinking cannot be off."""
        self.logprobs_off = "logprobsoff" in flags
        """Refuses ``responseLogprobs`` with the service's 400, as most Gemini models now do."""
        self.sentinels = "sentinels" in flags
        self.padded = "padded" in flags
        self.retired = "retired" in flags
        self.served_name = BASE_MODEL if "rerouted" in flags else name
        """The model that answers and that ``modelVersion`` names: ``toy`` for a rerouted name."""
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the emulator thread and tests share models
        self._rng = random.Random()

    @staticmethod
    @lru_cache(maxsize=256)
    def for_name(name: str) -> ToyModel:
        """The model a name denotes (cached per name); raises ``UnknownModelError``.

        A name is in the toy family when one of its dash-separated parts is
        ``toy`` (``toy``, ``gemini-toy-d0.25``, ``toy-thinking``); a leading
        ``models/`` is ignored. Parts ``d<x>`` (divergence dial) and ``s<n>``
        (perturbation seed) select the distribution; ``mustthink<N>`` and the
        parts in :data:`FLAGS`, anywhere in the name, select server behaviours
        and leave the distribution unchanged — but ``rerouted``, which answers
        from the base model ``toy`` whatever the dial and seed.
        """
        bare = name.removeprefix("models/")
        parts = bare.split("-")
        if "toy" not in parts:
            raise UnknownModelError(name)
        dial, seed, must_think = 0.0, 0, None
        for part in parts:
            if m := _NAME_DIAL.fullmatch(part):
                dial = float(m.group(1))
            elif m := _NAME_SEED.fullmatch(part):
                seed = int(m.group(1))
            elif m := _NAME_MUST_THINK.fullmatch(part):
                must_think = int(m.group(1))
        flags = FLAGS.intersection(parts)
        if "rerouted" in flags:
            dial, seed = 0.0, 0
        return ToyModel(bare, dial, seed, flags=flags, min_thinking_budget=must_think)

    def next_token_logprobs(self, prompt: str, prefill_ids: Sequence[int]) -> np.ndarray:
        """Log-distribution (float64, logsumexp 0) of the token after ``prefill_ids``.

        Depends only on the prompt, the last two context ids and the variant.
        The array is cached and shared, hence read-only.
        """
        last = prefill_ids[-1] if len(prefill_ids) >= 1 else -1
        prev = prefill_ids[-2] if len(prefill_ids) >= 2 else -1
        key = (_prompt_hash(prompt), prev, last)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        lp = self._compute(*key)
        lp.setflags(write=False)
        with self._lock:
            self._cache[key] = lp
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        return lp

    def _compute(self, prompt_hash: int, prev: int, last: int) -> np.ndarray:
        h = _stable_hash("ctx", prompt_hash, prev, last)
        # A per-context sharpness and an occasional dominant token spread the
        # entropies from ~0 (confident steps) to a few nats (open choices).
        sharpness = 0.8 + ((h >> 64) & 0xFFFF) / 0x10000
        logits = (_PRIOR + _SIGMA * _noise(h)) * sharpness
        if last in _SENTENCE_END:
            logits[EOS_ID] += 4.0
            logits[_CAPITAL] += 3.0
        if ((h >> 80) & 0xFFFF) < 0x10000 * _P_CONFIDENT:
            logits[int(np.argmax(logits))] += _CONFIDENT_BOOST
        if self.dial:
            direction = _noise(_stable_hash("dir", prompt_hash, prev, last, self.perturb_seed))
            logits += self.dial * _DIAL_SCALE * direction
        forbidden = _FORBIDDEN[last] if 0 <= last < VOCAB_SIZE else _NO_IDS
        logits[forbidden] = -np.inf
        top = logits.max()
        lp: np.ndarray = logits - (top + np.log(np.exp(logits - top).sum()))
        lp[forbidden] = MASKED_LOGPROB
        return lp

    def think(self, prompt: str, count: int, top_k_logprobs: int = 0) -> list[Step]:
        """``count`` thought tokens for ``prompt``: the most likely token but EOS at each step,
        after a context of their own, so thinking never ends early and never looks like the
        answer's steps."""
        context: list[int] = []
        steps: list[Step] = []
        for _ in range(count):
            lp = self.next_token_logprobs(THINKING_PREFIX + prompt, context)
            ranked = lp.copy()
            ranked[EOS_ID] = -np.inf
            token_id = int(np.argmax(ranked))
            chosen = Candidate(VOCAB[token_id], token_id, float(lp[token_id]))
            steps.append(Step(chosen, top_k(lp, top_k_logprobs)))
            context.append(token_id)
        return steps

    def sample(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        top_k_logprobs: int = 0,
        prefill_ids: Sequence[int] = (),
        scaled_logprobs: bool = False,
    ) -> Generation:
        """Generate up to ``max_tokens`` tokens after ``prefill_ids``.

        ``temperature`` 0 is greedy. The same ``seed`` with the same prompt and
        prefill gives the same output; ``None`` draws fresh randomness.
        Reported log-probabilities are the temperature-1 ones, like Gemini's,
        whatever the temperature; ``scaled_logprobs`` reports those of the
        distribution sampled from instead (at temperature 0, the chosen token alone).
        """
        rng = (
            self._rng
            if seed is None
            else random.Random(_stable_hash("seed", seed, prompt, *prefill_ids[-2:]))
        )
        context = list(prefill_ids)
        steps: list[Step] = []
        for _ in range(max_tokens):
            lp = self.next_token_logprobs(prompt, context)
            token_id = _draw(lp, temperature, rng)
            reported = _sampled_logprobs(lp, temperature) if scaled_logprobs else lp
            chosen = Candidate(VOCAB[token_id], token_id, float(reported[token_id]))
            top = top_k(reported, top_k_logprobs)
            if scaled_logprobs:
                top = [c for c in top if c.logprob > MASKED_LOGPROB]
            steps.append(Step(chosen, top))
            if token_id == EOS_ID:
                return Generation(steps, "STOP")
            context.append(token_id)
        return Generation(steps, "MAX_TOKENS")


def _sampled_logprobs(lp: np.ndarray, temperature: float) -> np.ndarray:
    """Log-probabilities of the distribution ``_draw`` samples from at ``temperature``."""
    if temperature == 1.0:
        return lp
    if temperature <= 0:
        greedy = np.full_like(lp, MASKED_LOGPROB)
        greedy[int(np.argmax(lp))] = 0.0
        return greedy
    logits = np.where(lp <= MASKED_LOGPROB, -np.inf, lp / temperature)
    top = logits.max()
    scaled = logits - (top + np.log(np.exp(logits - top).sum()))
    return np.where(np.isfinite(scaled), scaled, MASKED_LOGPROB)


def _draw(lp: np.ndarray, temperature: float, rng: random.Random) -> int:
    """Sample an id from ``lp`` at ``temperature``; masked ids are never drawn."""
    if temperature <= 0:
        return int(np.argmax(lp))
    if temperature == 1.0:
        probs = np.exp(lp)  # masked ids: exp(MASKED_LOGPROB) is exactly 0
    else:
        probs = np.exp((lp - lp.max()) / temperature)
        probs[lp <= MASKED_LOGPROB] = 0.0
    cdf = np.cumsum(probs)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return idx if idx < len(lp) else int(np.argmax(lp))
