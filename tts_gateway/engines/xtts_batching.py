"""Continuous batching of XTTS v2's GPT across concurrent requests.

Decoding one sequence reads every GPT weight for each audio token; several sequences decoded together
read them once. coqui-tts decodes through transformers' ``generate``, one request per call, so here the
GPT-2 stack of the loaded model runs by hand, the same weights and the same arithmetic as GPT-2's blocks:
every active sequence keeps its own rows of a key/value cache at its own length, and one step is one
forward pass over all of them (attention masked to each row's length). A request joins at the next step
(its prompt run first: alone, or in one padded pass with the unseeded prompts that arrived with it), leaves
when it samples the stop token, is cancelled or fails, and the others go on.

Sampling is ``generate``'s for XTTS (repetition penalty over the prompt's ids and the tokens so far, then
temperature, top-k, top-p, then one draw) with a random generator per sequence, so a sequence's tokens
depend on its seed only — not on which other requests share its steps. The arithmetic is another matter:
a batched matrix product rounds a row differently from the same row alone (measured here for 4 rows and
more), so a request whose client asked for its seed (``repeatable``) runs its steps as a batch of one,
and gives the same bytes alone and among others.

The batcher runs in rounds (a join, a step) on the process's torch thread (`torch_thread`), where the
engine's other torch calls (conditioning, some decodes) run between them. It takes a slot of the process's
core budget for each step (or prompt), not for a whole sentence, so another engine's request waits for one
such call, not for the sentence; an unseeded step takes every core when they are free and one when another
call (a decode on the narrow thread, a Piper request) holds the other, a seeded one the engine's fixed
thread count. A request with a seat in the batch lends its admission slot to the next
request (`lent_while_seated`): it waits on the steps then, and the seats (``max_batch``) bound such
requests instead of MAX_CONCURRENCY.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from tts_gateway.engines.torch_thread import TorchThread, torch_thread

log = logging.getLogger(__name__)

# Rows of the shared cache: enough for several listeners, bounded memory (TTS_GATEWAY_XTTS_MAX_BATCH).
DEFAULT_MAX_BATCH = 8
# Voices whose conditioning keys and values are kept (~8 MB each at XTTS v2's size): presets in use.
PREFIX_CACHE_VOICES = 16
_INITIAL_LENGTH = 128  # cache positions first allocated; doubled when a row needs more
# transformers' activations that are GELU's tanh approximation (``gelu_new``, GPT-2's, and its fused form)
_TANH_GELUS = frozenset({"NewGELUActivation", "GELUTanh", "PytorchGELUTanh"})


@dataclass(frozen=True)
class Sampling:
    """XTTS v2's sampling settings (``Xtts.inference_stream``'s defaults)."""

    temperature: float = 0.75
    top_k: int = 50
    top_p: float = 0.85
    repetition_penalty: float = 10.0


class KVCache:
    """Keys and values of up to ``rows`` sequences, each at its own length, for every layer.

    Storage grows on demand, positions and rows alike (doubling, so growth is amortised): a lone sentence
    in a cache of 8 rows allocates and copies one row's worth, not eight."""

    def __init__(self, layers: int, heads: int, head_dim: int, rows: int, like: Any) -> None:
        import torch

        self.limit = rows
        shape = (1, heads, _INITIAL_LENGTH, head_dim)
        self.keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.lengths: list[int] = []  # of the rows in use, rows 0…n-1

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def rows(self) -> int:
        """Rows allocated (at most ``limit``)."""
        return int(self.keys[0].shape[0])

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions in every row."""
        size = self.capacity
        while size < length:
            size *= 2
        self._grow(self.rows, size)

    def _grow(self, rows: int, size: int) -> None:
        import torch

        if rows == self.rows and size == self.capacity:
            return
        used = len(self.lengths)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = torch.zeros((rows, old.shape[1], size, old.shape[3]), dtype=old.dtype, device=old.device)
                grown[:used, :, : old.shape[2]] = old[:used]
                store[i] = grown

    def add_row(self) -> int:
        if len(self.lengths) == self.rows:
            if self.rows == self.limit:
                raise RuntimeError(f"the cache holds {self.limit} rows")
            self._grow(min(self.limit, 2 * self.rows), self.capacity)
        self.lengths.append(0)
        return len(self.lengths) - 1

    def load_prefix(self, row: int, prefix: list[tuple[Any, Any]]) -> None:
        """Start ``row`` with a computed prefix: per layer, keys and values ``[heads, L, head_dim]``."""
        length = int(prefix[0][0].shape[1])
        self.reserve(length)
        for layer, (keys, values) in enumerate(prefix):
            self.keys[layer][row, :, :length] = keys
            self.values[layer][row, :, :length] = values
        self.lengths[row] = length

    def drop_row(self, row: int) -> int | None:
        """Free ``row``; the last row moves into its place (rows stay 0…n-1). Returns the row that moved."""
        last = len(self.lengths) - 1
        moved = None
        if row != last:
            length = self.lengths[last]
            for store in (self.keys, self.values):
                for layer in store:
                    layer[row, :, :length] = layer[last, :, :length]
            self.lengths[row] = length
            moved = last
        self.lengths.pop()
        return moved


class GptStack:
    """XTTS's GPT-2 (``model.gpt``) run by hand over a `KVCache`: a prompt for one row, or one step for many.

    Args:
        gpt: The model's ``GPT`` module (``Xtts.gpt``).
    """

    def __init__(self, gpt: Any) -> None:
        self.gpt = gpt
        transformer = gpt.gpt
        self.blocks = list(transformer.h)
        self.ln_f = transformer.ln_f
        config = transformer.config
        self.heads = int(config.n_head)
        self.width = int(config.n_embd)
        self.head_dim = self.width // self.heads
        self.layers = len(self.blocks)
        self.start_audio_token = int(gpt.start_audio_token)
        self.stop_audio_token = int(gpt.stop_audio_token)

    @property
    def max_tokens(self) -> int:
        """Most audio tokens of one sentence (read each time: the benchmarks cap it)."""
        return int(self.gpt.max_gen_mel_tokens)

    def cache(self, rows: int) -> KVCache:
        return KVCache(self.layers, self.heads, self.head_dim, rows, next(self.gpt.parameters()))

    def prompt(self, cond_latent: Any, text_tokens: Any) -> Any:
        """The prompt's embeddings ``[1, P, C]``: conditioning, text, and the start-of-audio token
        (as ``GPT.compute_embeddings`` and the first call of ``GPT2InferenceModel.forward``)."""
        import torch
        import torch.nn.functional as F

        gpt = self.gpt
        text = F.pad(text_tokens, (0, 1), value=gpt.stop_text_token)
        text = F.pad(text, (1, 0), value=gpt.start_text_token)
        text_emb = gpt.text_embedding(text) + gpt.text_pos_embedding(text)
        start = torch.full((1, 1), self.start_audio_token, dtype=torch.long, device=text_tokens.device)
        start_emb = gpt.mel_embedding(start) + gpt.mel_pos_embedding.get_fixed_embedding(0, text_tokens.device)
        return torch.cat([cond_latent, text_emb, start_emb], dim=1)

    def token_embedding(self, tokens: list[int], positions: list[int], device: Any) -> Any:
        """``[n, 1, C]`` for each row's last token at its audio position (as ``GPT2InferenceModel.forward``)."""
        import torch

        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        emb = self.gpt.mel_embedding(ids)
        pos = self.gpt.mel_pos_embedding.emb(torch.tensor(positions, dtype=torch.long, device=device))[:, None]
        return emb + pos

    def forward(self, x: Any, cache: KVCache, rows: list[int], lengths: list[int] | None = None) -> Any:
        """Run ``x`` ``[n, T, C]`` (T new positions of each row in ``rows``) through the stack, appending
        keys and values to the cache; returns the final-normed latents of each row's last position ``[n, C]``.

        T > 1 for prompts (causal attention within them): one row's, or several rows' at once, right-padded
        to T, with ``lengths`` their real lengths (the padding's keys and values land past a row's length,
        where no later step looks and its next positions overwrite them)."""
        import torch
        import torch.nn.functional as F

        n, steps, _ = x.shape
        starts = [cache.lengths[r] for r in rows]
        real = lengths or [steps] * n
        cache.reserve(max(starts) + steps)
        total = max(starts) + steps
        index = torch.tensor(rows, dtype=torch.long, device=x.device)
        contiguous = rows == list(range(rows[0], rows[0] + n))
        # One step of rows at one length (a lone sentence, or rows that joined together): their new keys and
        # values go in by slicing, and every row sees every position up to there, so no mask.
        level = steps == 1 and contiguous and len(set(starts)) == 1
        where: Any = None  # each row's new position, for a step of rows at different lengths
        if level:
            mask = None
        elif steps == 1:
            where = torch.tensor(starts, dtype=torch.long, device=x.device)
            visible = torch.arange(total, device=x.device)[None, :] <= where[:, None]
            mask = visible[:, None, None, :]  # [n, 1, 1, total]
        elif n > 1:  # each row's query j (at its position start + j) sees its keys up to there
            at = torch.tensor(starts, device=x.device)[:, None] + torch.arange(steps, device=x.device)[None, :]
            mask = (torch.arange(total, device=x.device)[None, None, :] <= at[:, :, None])[:, None]
        else:
            mask = None
        for layer, block in enumerate(self.blocks):
            hidden = block.ln_1(x)
            qkv = block.attn.c_attn(hidden)
            q, k, v = qkv.view(n, steps, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            keys, values = cache.keys[layer], cache.values[layer]
            if level:
                first, start = rows[0], starts[0]
                keys[first: first + n, :, start: start + 1] = k
                values[first: first + n, :, start: start + 1] = v
                attended = F.scaled_dot_product_attention(q, keys[first: first + n, :, :total],
                                                          values[first: first + n, :, :total])
            elif steps == 1:
                keys[index, :, where] = k[:, :, 0]
                values[index, :, where] = v[:, :, 0]
                if contiguous:
                    k_all = keys[rows[0]: rows[0] + n, :, :total]
                    v_all = values[rows[0]: rows[0] + n, :, :total]
                else:
                    k_all, v_all = keys[index, :, :total], values[index, :, :total]
                attended = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
            elif n > 1:
                for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
                    keys[row, :, start: start + steps] = k[i]
                    values[row, :, start: start + steps] = v[i]
                attended = F.scaled_dot_product_attention(q, keys[index, :, :total], values[index, :, :total],
                                                          attn_mask=mask)
            else:
                row, start = rows[0], starts[0]
                keys[row, :, start: start + steps] = k[0]
                values[row, :, start: start + steps] = v[0]
                if start:
                    k_all = keys[row: row + 1, :, : start + steps]
                    v_all = values[row: row + 1, :, : start + steps]
                    causal = torch.ones(steps, start + steps, dtype=torch.bool, device=x.device).tril(start)
                    attended = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=causal)
                else:
                    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            attended = attended.transpose(1, 2).reshape(n, steps, self.width)
            x = x + block.attn.c_proj(attended)
            x = x + self._mlp(block.mlp, block.ln_2(x))
        for r, length in zip(rows, real, strict=True):
            cache.lengths[r] += length
        last = x[:, -1] if lengths is None else x[torch.arange(n, device=x.device), torch.tensor(real) - 1]
        return self.gpt.final_norm(self.ln_f(last))

    @staticmethod
    def _mlp(mlp: Any, x: Any) -> Any:
        """GPT-2's MLP without its module calls (dropout is off at inference); its ``gelu_new`` through
        PyTorch's own tanh GELU: the same formula in one kernel instead of seven (a step's latents move by
        ~1e-6; test_xtts_batching checks the step against transformers' own forward)."""
        import torch.nn.functional as F

        hidden = mlp.c_fc(x)
        act = mlp.act
        hidden = F.gelu(hidden, approximate="tanh") if type(act).__name__ in _TANH_GELUS else act(hidden)
        return mlp.c_proj(hidden)

    def logits(self, latents: Any) -> Any:
        """``mel_head`` over final-normed latents (``GPT2InferenceModel.lm_head`` is final_norm, mel_head)."""
        return self.gpt.mel_head(latents).float()


def probe_step(stack: GptStack, rows: int, length: int = 64) -> None:
    """One batched step of ``rows`` sequences ``length`` positions long (to measure kernels; no request)."""
    import torch

    cache = stack.cache(rows)
    for row in range(rows):
        cache.add_row()
        cache.lengths[row] = length
    device = next(stack.gpt.parameters()).device
    x = torch.zeros(rows, 1, stack.width, device=device, dtype=next(stack.gpt.parameters()).dtype)
    with torch.inference_mode():
        stack.logits(stack.forward(x, cache, list(range(rows))))


def sample(logits: Any, seen: Any, generator: Any, sampling: Sampling) -> int:
    """One token from a row's logits ``[V]``: ``generate``'s repetition penalty over ``seen`` (the ids so far,
    prompt placeholders included), temperature, top-k and top-p, then a draw from ``generator``."""
    import torch

    scores = logits.clone()
    if sampling.repetition_penalty != 1.0:
        picked = scores.gather(0, seen)
        picked = torch.where(picked < 0, picked * sampling.repetition_penalty, picked / sampling.repetition_penalty)
        scores.scatter_(0, seen, picked)
    scores = scores / sampling.temperature
    if 0 < sampling.top_k < scores.shape[0]:
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - sampling.top_p)
        remove[-1] = False  # keep at least one
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


_END = object()


@dataclass(eq=False)
class Sequence:
    """One request's GPT decoding: its prompt, its sampling and generator, and where its latents go.

    The consumer iterates `latents()`; the batcher feeds it. ``cancel()`` makes the batcher drop it at
    its next step.
    """

    prompt: Any  # [1, P, C]
    seed: int
    repeatable: bool
    # The prompt's first positions that are the voice's conditioning (the same for every sentence of a voice):
    # run apart, their keys and values are kept per voice (`PrefixCache`). 0: the prompt runs in one piece.
    prefix: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    _out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # Set when it has a seat in the batch: at submit when one is free (it is seated at the next round), else
    # when the batcher takes it from its queue.
    seated: threading.Event = field(default_factory=threading.Event, repr=False)
    generator: Any = field(init=False, repr=False)  # seeded from ``seed``: the draws depend on it alone
    seen: Any = None  # token ids the repetition penalty applies to

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    @property
    def split(self) -> bool:
        """Its prompt runs as the voice's conditioning (from `PrefixCache`), then the text."""
        return 0 < self.prefix < int(self.prompt.shape[1])

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, item: Any) -> None:
        self._out.put(item)

    def latents(self, cancel: threading.Event | None = None, poll_s: float = 0.05) -> Iterator[Any]:
        """The latents ``[1, C]`` as they come, one per token (the stop token's included, as coqui's stream);
        re-raises the batcher's error for this sequence. A set ``cancel`` cancels the sequence."""
        while True:
            try:
                item = self._out.get(timeout=poll_s)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    self.cancel()
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def lent_while_seated(sequence: Sequence, latents: Iterator[Any],
                      lend: Callable[[], AbstractContextManager[None]] | None,
                      cancel: threading.Event, poll_s: float = 0.05) -> Generator[Any, None, None]:
    """``latents``, with the request's admission slot lent out from the moment the sequence has a seat in the
    batch (`GptBatcher.submit`) until its last latent: meanwhile the request waits on the shared steps, not on
    a core, so more requests can join the batch than MAX_CONCURRENCY lets run. A sequence still queued for a
    seat keeps its slot, so past the batch size the admission queue (and its 503) holds the rest."""
    if lend is None:
        yield from latents
        return
    while not sequence.seated.wait(poll_s):
        if cancel.is_set():
            break
    with lend():
        yield from latents


class PrefixCache:
    """Keys and values of the conditioning positions of recent voices, by the conditioning's content.

    A prompt is the voice's 32 conditioning latents, then the sentence's text: causal attention makes the
    conditioning's keys and values the same for every sentence of a voice, so they are computed once and
    the prompt runs only its text (the larger part of a prompt's cost for a short sentence). The
    conditioning is always run apart, cached or not, so a seeded request's arithmetic — and its bytes — do
    not depend on what the cache held. Kept per thread count too (an unseeded join may run on fewer threads
    than a seeded one, and a sum split across other threads may round differently).
    """

    def __init__(self, stack: GptStack, voices: int = PREFIX_CACHE_VOICES) -> None:
        self.stack = stack
        self.voices = voices
        self._kept: collections.OrderedDict[bytes, list[tuple[Any, Any]]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, conditioning: Any) -> list[tuple[Any, Any]]:
        """Per layer, the keys and values ``[heads, L, head_dim]`` of ``conditioning`` ``[1, L, C]``."""
        import hashlib

        import torch

        data = conditioning.detach().to("cpu", torch.float32).contiguous()
        shape = repr((tuple(data.shape), torch.get_num_threads())).encode()
        digest = hashlib.blake2b(shape + data.numpy().tobytes(), digest_size=16).digest()
        kept = self._kept.get(digest)
        if kept is not None:
            self._kept.move_to_end(digest)
            self.hits += 1
            return kept
        self.misses += 1
        scratch = self.stack.cache(1)
        scratch.add_row()
        self.stack.forward(conditioning, scratch, [0])
        length = scratch.lengths[0]
        kept = [(keys[0, :, :length].clone(), values[0, :, :length].clone())
                for keys, values in zip(scratch.keys, scratch.values, strict=True)]
        self._kept[digest] = kept
        while len(self._kept) > self.voices:
            self._kept.popitem(last=False)
        return kept


class GptBatcher:
    """Decodes every active `Sequence` together, one GPT step at a time, in rounds on the torch thread.

    Args:
        stack: The model's GPT, run by hand.
        max_batch: Most sequences in the shared batch; more wait for a row.
        cores: Context manager factory for a slot of the process's core budget (held per step), given whether
            the call is a seeded sequence's (its thread count must be fixed).
        observer: Told how many sequences each step carried (the gateway's batch-size histogram).
        runner: The thread its rounds run on (the process's torch thread by default).
    """

    def __init__(self, stack: GptStack, max_batch: int, cores: Callable[[bool], AbstractContextManager[Any]], *,
                 observer: Callable[[int], None] | None = None, runner: TorchThread | None = None) -> None:
        self.stack = stack
        self.observer = observer  # told the number of sequences of every step
        self.max_batch = max(1, max_batch)
        self.cores = cores
        self.prefixes = PrefixCache(stack)  # used on the torch thread only: no lock
        self._lock = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._shared = stack.cache(self.max_batch)
        self._rows: list[Sequence] = []  # the shared cache's rows, in order
        self._alone: list[tuple[Sequence, KVCache]] = []  # repeatable sequences, a cache each
        self._seating = 0  # sequences of the running round's join (taken from the queue, not yet in a row)
        self._stopped = False
        self.steps = 0  # GPT steps run, shared or alone (for tests and benchmarks)
        self.widest = 0  # most sequences in one step
        self.prompts_together = 0  # prompts run in a batched pass with others (for tests and benchmarks)
        self._runner = runner or torch_thread()  # its rounds run there, between the engine's other torch calls
        self._runner.attach(self)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._rows) + len(self._alone)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def stepping(self) -> bool:
        """Whether GPT steps of unseeded sequences are to come (one waits for a seat or has tokens to make)."""
        with self._lock:
            return any(not s.repeatable and not s.cancelled and not (s.tokens and self._ended(s))
                       for s in (*self._waiting, *self._rows))

    def submit(self, *sequences: Sequence) -> None:
        """Queue ``sequences`` for seats; several given at once arrive together (seated in one round). Those
        for which a seat is free have it at once (`Sequence.seated`): their requests lend their admission
        slots now, so the next requests' prompts can join the same round instead of one round each."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the XTTS batcher is stopped (the model was unloaded)")
            self._waiting.extend(sequences)
            # The queue is seated in order: its first `free` entries are seated at the next round.
            free = self.max_batch - len(self._rows) - len(self._alone) - self._seating
            for sequence in list(self._waiting)[:max(0, free)]:
                sequence.seated.set()
        self._runner.wake()

    def close(self) -> None:
        """Stop: every sequence still waiting or decoding fails with "unloaded" (run between two rounds)."""
        self._runner.call(self._shutdown, urgent=True)

    def _shutdown(self) -> None:
        self._runner.detach(self)
        with self._lock:
            self._stopped = True
            left = [*self._waiting, *self._rows, *(s for s, _ in self._alone)]
            self._waiting.clear()
            self._rows.clear()
            self._alone.clear()
        for sequence in left:
            sequence.put(RuntimeError("the XTTS model was unloaded"))

    # -- the rounds (on the torch thread) --------------------------------------------------------------
    def busy(self) -> bool:
        with self._lock:
            return not self._stopped and bool(self._waiting or self._rows or self._alone)

    def tick(self) -> None:
        """One round: seat the sequences that wait (as many as there are seats), then one GPT step of each."""
        import torch

        with self._lock:
            joining: list[Sequence] = []
            # Seeded sequences step alone but take seats too: the seats bound the requests that wait
            # here without an admission slot (see `lent_while_seated`).
            while self._waiting and len(self._rows) + len(self._alone) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
            self._seating = len(joining)
        try:
            with torch.inference_mode():
                try:
                    self._join_all(joining)
                finally:
                    with self._lock:
                        self._seating = 0
                self._step_shared()
                for sequence, cache in list(self._alone):
                    self._step_alone(sequence, cache)
        except Exception as exc:  # a failure of the whole step fails every sequence in it
            log.exception("XTTS batched step failed")
            for sequence in [*self._rows, *(s for s, _ in self._alone)]:
                sequence.put(exc)
            self._rows.clear()
            self._alone.clear()
            self._shared = self.stack.cache(self.max_batch)

    def _join_all(self, joining: list[Sequence]) -> None:
        """Seat the sequences that arrived together. Unseeded ones of a cached voice run their prompts' text as
        one batched forward pass (a prompt is compute-bound: four together cost ~15 % less than one by one);
        seeded ones alone, as their bytes must not depend on company. If the batched pass fails, each is
        joined alone, so only a sequence whose own prompt fails fails."""
        together = [s for s in joining if not s.repeatable and s.split and not s.cancelled]
        if len(together) < 2:
            together = []
        for sequence in joining:
            if sequence not in together:
                self._join(sequence)
        if together and not self._join_together(together):
            for sequence in together:
                self._join(sequence)

    def _join_together(self, group: list[Sequence]) -> bool:
        import torch

        stack = self.stack
        cache = self._shared
        rows: list[int] = []
        for sequence in group:
            sequence.seated.set()
        try:
            cache.reserve(max(int(s.prompt.shape[1]) for s in group) + 1)
            with self.cores(False):
                texts = []
                for sequence in group:
                    rows.append(cache.add_row())
                    texts.append(self._start(sequence, cache, rows[-1]))
                lengths = [int(t.shape[1]) for t in texts]
                width = max(lengths)
                padded = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in texts])
                latents = stack.forward(padded, cache, rows, lengths)
                logits = stack.logits(latents)
        except Exception:
            log.warning("XTTS prompts run together failed; each runs alone", exc_info=True)
            for row in reversed(rows):
                cache.drop_row(row)
            return False
        self.prompts_together += len(group)
        for i, sequence in enumerate(group):
            self._rows.append(sequence)
            try:
                token = sample(logits[i], sequence.seen, sequence.generator, sequence.sampling)
            except Exception as exc:  # its own draw: it alone fails (its row goes at the next step)
                sequence.put(exc)
                sequence.cancel()
                continue
            self._deliver(sequence, token, latents[i: i + 1])
        return True

    def _start(self, sequence: Sequence, cache: KVCache, row: int) -> Any:
        """Start ``sequence`` in ``row`` (its voice's conditioning loaded when its prompt is split); returns the
        part of its prompt still to run."""
        import torch

        # generate's ids: a placeholder (1) per prompt position, the start token last; all are penalised.
        sequence.seen = torch.tensor(sorted({1, self.stack.start_audio_token}), dtype=torch.long)
        if not sequence.split:
            return sequence.prompt
        cache.load_prefix(row, self.prefixes.get(sequence.prompt[:, :sequence.prefix]))
        return sequence.prompt[:, sequence.prefix:]

    def _join(self, sequence: Sequence) -> None:
        """Run the prompt of a new sequence (alone) and deliver its first token's latent."""
        sequence.seated.set()
        if sequence.cancelled:
            sequence.put(_END)
            return
        stack = self.stack
        try:
            if sequence.repeatable:
                cache = stack.cache(1)
                row = cache.add_row()
            else:
                cache, row = self._shared, self._shared.add_row()
            cache.reserve(int(sequence.prompt.shape[1]) + 1)  # later steps grow every row by doubling, as they need
            try:
                with self.cores(sequence.repeatable):
                    latent = stack.forward(self._start(sequence, cache, row), cache, [row])
                    token = sample(stack.logits(latent)[0], sequence.seen, sequence.generator, sequence.sampling)
            except Exception:
                cache.drop_row(row)
                raise
        except Exception as exc:  # this sequence's own failure (its prompt): it alone fails
            log.exception("XTTS sequence failed to start")
            sequence.put(exc)
            return
        if sequence.repeatable:
            self._alone.append((sequence, cache))
        else:
            self._rows.append(sequence)
        self._deliver(sequence, token, latent[0:1])

    def _deliver(self, sequence: Sequence, token: int, latent: Any) -> None:
        import torch

        sequence.tokens.append(token)
        sequence.put(latent.clone())
        if token not in sequence.seen.tolist():
            sequence.seen = torch.cat([sequence.seen, torch.tensor([token], dtype=torch.long)])
        if self._ended(sequence):
            sequence.put(_END)

    def _ended(self, sequence: Sequence) -> bool:
        """It sampled the stop token or reached the most tokens a sentence may have."""
        return sequence.tokens[-1] == self.stack.stop_audio_token or len(sequence.tokens) >= self.stack.max_tokens

    def _finished(self, sequence: Sequence) -> bool:
        return sequence.cancelled or self._ended(sequence)

    def _prune(self) -> None:
        for sequence in [s for s in self._rows if self._finished(s)]:
            row = self._rows.index(sequence)
            moved = self._shared.drop_row(row)
            if moved is not None:
                self._rows[row] = self._rows[moved]
            self._rows.pop()
            if sequence.cancelled:
                sequence.put(_END)
        for sequence, cache in [(s, c) for s, c in self._alone if self._finished(s)]:
            self._alone.remove((sequence, cache))
            if sequence.cancelled:
                sequence.put(_END)
        if not self._rows and (self._shared.capacity > _INITIAL_LENGTH or self._shared.rows > 1):
            self._shared = self.stack.cache(self.max_batch)  # an idle batch gives back what a long one grew

    def _step(self, sequences: list[Sequence], cache: KVCache) -> None:
        """One GPT step of ``sequences``, the rows 0…n-1 of ``cache``: one forward pass, then one draw each
        (a draw that fails, e.g. on probabilities that are not finite, fails that sequence only)."""
        stack = self.stack
        device = next(stack.gpt.parameters()).device
        with self.cores(any(s.repeatable for s in sequences)):
            x = stack.token_embedding([s.tokens[-1] for s in sequences], [len(s.tokens) for s in sequences], device)
            latents = stack.forward(x, cache, list(range(len(sequences))))
            logits = stack.logits(latents)
            picks: list[int | BaseException] = []
            for i, sequence in enumerate(sequences):
                try:
                    picks.append(sample(logits[i], sequence.seen, sequence.generator, sequence.sampling))
                except Exception as exc:
                    picks.append(exc)
        self.steps += 1
        self.widest = max(self.widest, len(self._rows) + len(self._alone))
        self._observe(len(sequences))
        for i, (sequence, pick) in enumerate(zip(sequences, picks, strict=True)):
            if isinstance(pick, BaseException):
                sequence.put(pick)
                sequence.cancel()
            else:
                self._deliver(sequence, pick, latents[i: i + 1])

    def _step_shared(self) -> None:
        self._prune()
        if self._rows:
            self._step(list(self._rows), self._shared)  # a failed forward pass fails the whole batch (tick)
        self._prune()

    def _step_alone(self, sequence: Sequence, cache: KVCache) -> None:
        if not self._finished(sequence):
            try:
                self._step([sequence], cache)
            except Exception as exc:  # its own forward pass: it alone fails
                sequence.put(exc)
                sequence.cancel()
        self._prune()

    def _observe(self, size: int) -> None:
        observer = self.observer
        if observer is not None:
            try:
                observer(size)
            except Exception:  # metrics must never stop decoding
                log.exception("batch observer failed")


__all__ = ["DEFAULT_MAX_BATCH", "GptBatcher", "GptStack", "KVCache", "PrefixCache", "Sampling", "Sequence",
           "probe_step", "sample"]
