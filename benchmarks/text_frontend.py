"""The text front end's cost (normalization, lexicon and SSML parsing) per 1000 characters, against the
synthesis of one Piper sentence (in-process, one thread). Target: under 2 %."""

from __future__ import annotations

from benchmarks.common import Budget, Context, Result, interleave, median, paired
from benchmarks.texts import ONE_SENTENCE

# Every kind of written form the normalizer rewrites, in SSML with breaks, say-as, sub and prosody.
PARAGRAPH = ("Dr. Smith paid $1,234.50 on 12/05/2026 at 3:30 pm for 21 items, e.g. 3.5 kg of apples at 20% off. "
             'Call 555-123-4567.<break time="300ms"/> It was -5 °C, pages 10-20, the 21st of 1999. ')
DOCUMENT = ('<speak><p><s>' + PARAGRAPH * 2 + '</s><s><say-as interpret-as="characters">ABC</say-as> '
            '<sub alias="World Wide Web">WWW</sub> <prosody rate="slow">Nginx serves 42 sites.</prosody>'
            '</s></p></speak>')


def run(ctx: Context, result: Result) -> None:
    from tts_gateway.config import Settings
    from tts_gateway.core.compose import build_core
    from tts_gateway.core.frontend import prepare
    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.voices.lexicon import LexiconEntry

    entries = {"nginx": LexiconEntry("nginx", "en", "engine ex"), "ABC": LexiconEntry("ABC", "en", "a b c")}
    # Piper alone (no tiny XTTS to build), one thread, as the other in-process comparisons run it.
    core = build_core(Settings(data_dir=ctx.workdir / "frontend-data", engines=("piper",),
                               engine_threads=ctx.threads, canary=False), load_entry_points=False, phrase_cache=False)
    ctx.stack.callback(core.close)
    piper = core.engines.ensure_loaded("piper")
    options = SynthesisOptions(language="en", seed=1, repeatable=True)
    sides = {
        "front end, 1000 chars": lambda: prepare(DOCUMENT, "en", text_format="ssml", lexicon=lambda _lang: entries),
        "Piper sentence": lambda: list(piper.synthesize(ONE_SENTENCE, VoiceInput(builtin="joe"), options)),
    }
    samples = interleave(sides, rounds=5 if ctx.quick else 30, budget=Budget(20 if ctx.quick else 60), warmup=2)
    # Scaled to exactly 1000 characters of document (markup included).
    per_1000 = [seconds * 1000 / len(DOCUMENT) for seconds in samples["front end, 1000 chars"]]
    result.figures.append(paired(
        "text front end per 1000 chars (SSML + lexicon + normalization) / one Piper sentence", per_1000,
        samples["Piper sentence"], {"front end per 1000 chars": median(per_1000),
                                    "Piper sentence": median(samples["Piper sentence"])},
        target=("<=", 0.02), document_chars=len(DOCUMENT)))
