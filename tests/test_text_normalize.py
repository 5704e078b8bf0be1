"""Issue 33: written forms are spoken as words, per language (numbers, years, dates, times, money,
percentages, units, phone numbers, abbreviations), through the one front end every engine gets."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import assert_problem
from tts_gateway.core.frontend import prepare
from tts_gateway.core.frontend.normalize import normalize

# (language, written, spoken)
TABLE = [
    # English
    ("en", "I have 3 apples.", "I have three apples."),
    ("en", "It costs $1,234.50.", "It costs one thousand two hundred and thirty-four dollars and fifty cents."),
    ("en", "It costs $5.", "It costs five dollars."),
    ("en", "Only £0.99 today.", "Only ninety-nine pence today."),
    ("en", "Meet at 3:30 pm.", "Meet at three thirty p m."),
    ("en", "Meet at 3:05.", "Meet at three oh five."),
    ("en", "Lunch at 12:00.", "Lunch at twelve o'clock."),
    ("en", "Born on 12/05/2026.", "Born on December fifth twenty twenty-six."),
    ("en", "Due 2026-05-12.", "Due May twelfth twenty twenty-six."),
    ("en", "The 21st runner.", "The twenty-first runner."),
    ("en", "The 2nd and 3rd.", "The second and third."),
    ("en", "In 1999 it rained.", "In nineteen ninety-nine it rained."),
    ("en", "In 2026 it rained.", "In twenty twenty-six it rained."),
    ("en", "Pi is 3.14.", "Pi is three point one four."),
    ("en", "It was -5 degrees.", "It was minus five degrees."),
    ("en", "Read pages 10-20.", "Read pages ten to twenty."),
    ("en", "Up 50% today.", "Up fifty percent today."),
    ("en", "Drive at 12 km/h.", "Drive at twelve kilometers per hour."),
    ("en", "It weighs 1 kg.", "It weighs one kilogram."),
    ("en", "It is 20 °C.", "It is twenty degrees Celsius."),
    ("en", "Call 555-123-4567 now.", "Call five five five, one two three, four five six seven now."),
    ("en", "Dr. Smith is here.", "Doctor Smith is here."),
    ("en", "Mr. and Mrs. Jones.", "Mister and Missus Jones."),
    ("en", "Fruit, e.g. apples.", "Fruit, for example apples."),
    ("en", "Apples, pears etc.", "Apples, pears et cetera."),
    ("en", "We sold 12,000 units.", "We sold twelve thousand units."),
    ("en", "Play MP3 files.", "Play MP three files."),
    ("en", "No digits here.", "No digits here."),
    # German
    ("de", "Ich habe 3 Äpfel.", "Ich habe drei Äpfel."),
    ("de", "Es kostet 1.234,50 €.", "Es kostet eintausendzweihundertvierunddreißig Euro und fünfzig Cent."),
    ("de", "Um 15:45 Uhr.", "Um fünfzehn Uhr fünfundvierzig."),
    ("de", "Um 15:00 Uhr.", "Um fünfzehn Uhr."),
    ("de", "Am 12.05.2026.", "Am zwölfter Mai zweitausendsechsundzwanzig."),
    ("de", "Der 3. Mai.", "Der dritter Mai."),
    ("de", "Es sind 3,5 km.", "Es sind drei Komma fünf Kilometer."),
    ("de", "Genau 20% mehr.", "Genau zwanzig Prozent mehr."),
    ("de", "Im Jahr 1999.", "Im Jahr neunzehnhundertneunundneunzig."),
    ("de", "Es ist -3 Grad.", "Es ist minus drei Grad."),
    ("de", "Seiten 10-20.", "Seiten zehn bis zwanzig."),
    ("de", "Dr. Müller kommt.", "Doktor Müller kommt."),
    ("de", "Obst, z.B. Äpfel.", "Obst, zum Beispiel Äpfel."),
    ("de", "Äpfel, Birnen usw.", "Äpfel, Birnen und so weiter."),
    ("de", "Tempo 50 km/h.", "Tempo fünfzig Kilometer pro Stunde."),
    # French
    ("fr", "J'ai 3 pommes.", "J'ai trois pommes."),
    ("fr", "Il coûte 1 234,50 €.", "Il coûte mille deux cent trente-quatre euros et cinquante centimes."),
    ("fr", "À 15h30.", "À quinze heures trente."),
    ("fr", "À 15:30.", "À quinze heures trente."),
    ("fr", "À 1h.", "À une heure."),
    ("fr", "Le 12/05/2026.", "Le douze mai deux mille vingt-six."),
    ("fr", "Le 1er mai.", "Le premier mai."),
    ("fr", "Le 21e siècle.", "Le vingt et unième siècle."),
    ("fr", "Pi vaut 3,14.", "Pi vaut trois virgule quatorze."),
    ("fr", "Hausse de 25%.", "Hausse de vingt-cinq pour cent."),
    ("fr", "Il fait -5 °C.", "Il fait moins cinq degrés Celsius."),
    ("fr", "Pages 10-20.", "Pages dix à vingt."),
    ("fr", "M. Dupont arrive.", "Monsieur Dupont arrive."),
    ("fr", "Mme Curie.", "Madame Curie."),
    ("fr", "Appelez le 06 12 34 56 78.", "Appelez le zéro six, un deux, trois quatre, cinq six, sept huit."),
    ("fr", "Il pèse 2 kg.", "Il pèse deux kilogrammes."),
    # Spanish
    ("es", "Tengo 3 manzanas.", "Tengo tres manzanas."),
    ("es", "Cuesta 1.234,50 €.", "Cuesta mil doscientos treinta y cuatro euros con cincuenta céntimos."),
    ("es", "A las 15:45.", "A las quince y cuarenta y cinco."),
    ("es", "A las 15:00.", "A las quince horas."),
    ("es", "El 12/05/2026.", "El doce de mayo de dos mil veintiséis."),
    ("es", "El 1º de mayo.", "El primero de mayo."),
    ("es", "Son 3,5 kg.", "Son tres coma cinco kilogramos."),
    ("es", "Sube un 25%.", "Sube un veinticinco por ciento."),
    ("es", "Hace -2 °C.", "Hace menos dos grados Celsius."),
    ("es", "Páginas 10-20.", "Páginas diez a veinte."),
    ("es", "El Sr. García llega.", "El señor García llega."),
    ("es", "Frutas, etc.", "Frutas, etcétera."),
    ("es", "Va a 100 km/h.", "Va a cien kilómetros por hora."),
    # Other languages num2words knows: numbers only
    ("it", "Ho 42 anni.", "Ho quarantadue anni."),
    ("it", "Costa 3,5 euro.", "Costa tre virgola cinque euro."),
    ("pt-br", "Tenho 42 anos.", "Tenho quarenta e dois anos."),
    ("nl", "Ik ben 42.", "Ik ben tweeënveertig."),
    ("pl", "Mam 3 koty.", "Mam trzy koty."),
    # Languages with no rules: unchanged
    ("zz", "I have 3 apples.", "I have 3 apples."),
    ("zh", "我有3个苹果", "我有3个苹果"),
]


def test_the_table_has_at_least_sixty_rows_across_en_de_fr_es() -> None:
    per_language = {code: sum(1 for row in TABLE if row[0] == code) for code in ("en", "de", "fr", "es")}
    assert len(TABLE) >= 60 and all(count >= 10 for count in per_language.values()), per_language


@pytest.mark.parametrize(("language", "written", "spoken"), TABLE, ids=[f"{r[0]}-{r[1][:24]}" for r in TABLE])
def test_written_forms_are_spoken_as_words(language: str, written: str, spoken: str) -> None:
    assert normalize(written, language) == spoken


def test_regional_codes_use_their_language_rules() -> None:
    assert normalize("3 apples", "en-US") == "three apples"
    assert normalize("Tenho 2 anos", "pt-BR") == "Tenho dois anos"


def test_normalize_false_passes_the_text_through() -> None:
    assert prepare("Dr. Smith paid $5.", "en", normalize_text=False).text == "Dr. Smith paid $5."
    assert prepare("Dr. Smith paid $5.", "en").text == "Doctor Smith paid five dollars."


def test_a_number_num2words_cannot_say_stays_written() -> None:
    huge = "9" * 400  # beyond num2words' range: left as digits, never an error
    assert normalize(f"I have {huge} things.", "en") == f"I have {huge} things."


def test_every_request_gets_the_spoken_text_unless_it_says_normalize_false(fake_client: Any) -> None:
    """The fake engine's tone follows the length of the text it is given, so equal bytes mean equal text."""
    def say(text: str, **fields: Any) -> bytes:
        response = fake_client.post("/v1/synthesize", json={"text": text, "format": "pcm", "cache": False, **fields})
        assert response.status_code == 200, response.text
        return bytes(response.content)

    written, spoken = "Dr. Smith paid $5.", "Doctor Smith paid five dollars."
    assert say(written) == say(spoken)
    assert say(written, normalize=False) != say(spoken) and say(written, normalize=False) == say(written,
                                                                                                normalize=False)
    speech = fake_client.post("/v1/audio/speech", json={"input": written, "voice": "fake:one",
                                                        "response_format": "pcm"})
    assert speech.status_code == 200 and speech.content == say(spoken, sample_rate=24000)  # OpenAI pcm: 24 kHz
    dry = fake_client.post("/v1/text/normalize", json={"text": written, "language": "en"})
    assert dry.status_code == 200 and dry.json()["text"] == spoken
    raw = fake_client.post("/v1/text/normalize", json={"text": written, "language": "en", "normalize": False})
    assert raw.json()["text"] == written


def test_the_dry_run_checks_what_a_synthesis_checks(fake_client: Any) -> None:
    assert_problem(fake_client.post("/v1/text/normalize", json={"text": "Hi", "language": "xx"}), 422, "does not speak")
    assert_problem(fake_client.post("/v1/text/normalize", json={"text": "Hi"}), 422, "language")
    assert_problem(fake_client.post("/v1/text/normalize", json={"text": " ", "language": "en"}), 422, "empty")
    assert_problem(fake_client.post("/v1/text/normalize", json={"text": "Hi", "language": "en", "voice": "nobody"}),
                   404, "nobody")
