"""The text front end's cost (normalization, lexicon and SSML parsing) per 1000 characters, against the
synthesis of one Piper sentence (in-process, one thread). Target: under 2 %."""

from __future__ import annotations

from benchmarks.common import Budget, Context, Result, interleave, median, paired
from benchmarks.texts import ONE_SENTENCE

# Every kind of written form the normalizer rewrites, in SSML with breaks, say-as, sub and prosody. Each
# paragraph has its own numbers (nothing repeats within the document), and the document is about 1000
# characters, timed as one call: the target is per 1000 characters.
PARAGRAPH = ("Dr. Smith paid ${amount} on {month}/{day:02d}/{year} at {hour}:{minute:02d} pm for {count} items, e.g. "
             "{kilos} kg of apples at {percent}% off. "
             'Call 555-{exchange}-{line}.<break time="300ms"/> It was -{cold} °C, pages {first}-{last}, the {nth} of '
             "{old_year}. ")
ORDINALS = {1: "st", 2: "nd", 3: "rd"}


def paragraph(index: int) -> str:
    nth = 21 + 10 * index
    return PARAGRAPH.format(
        amount=f"{1234 + 1111 * index:,}.{50 + index}", month=1 + index, day=5 + index, year=2026 - index,
        hour=1 + index, minute=30 + index, count=21 + index, kilos=f"{3 + index}.5", percent=20 + 5 * index,
        exchange=123 + index, line=4567 + index, cold=5 + index, first=10 + index, last=20 + index,
        nth=f"{nth}{ORDINALS.get(nth % 10, 'th')}", old_year=1999 - 37 * index)


DOCUMENT = ('<speak><p><s>' + "".join(paragraph(i) for i in range(5)) +
            '</s><s><say-as interpret-as="characters">ABC</say-as> '
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
