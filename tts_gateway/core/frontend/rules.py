"""Per-language rule tables for the normalizer: separators, words and abbreviations.

English, German, French and Spanish have full tables; every other language num2words knows gets
`numbers_only` (numbers and signs, nothing else). Abbreviations are matched case-sensitively as
whole words; a *title* ("Dr.") never ends a sentence, so its period is dropped, while other
abbreviations keep their period when they end the text or precede a capital (a new sentence).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LanguageRules:
    code: str  # num2words' language code
    decimal: str = "."
    thousands: tuple[str, ...] = (",",)
    minus: str = "minus"
    percent: str = "percent"
    range_word: str = "to"
    month_names: tuple[str, ...] = ()
    day_first: bool = True
    full: bool = True  # dates, times, money, units, abbreviations; else numbers only
    titles: dict[str, str] = field(default_factory=dict)
    abbreviations: dict[str, str] = field(default_factory=dict)
    units: dict[str, tuple[str, str]] = field(default_factory=dict)  # symbol → (singular, plural)
    currencies: dict[str, str] = field(default_factory=dict)  # symbol → ISO code for num2words
    ordinal_suffix: str = ""  # regex of the suffixes that make a number ordinal ("st|nd|rd|th")


_CURRENCIES = {"$": "USD", "€": "EUR", "£": "GBP"}

EN = LanguageRules(
    code="en", decimal=".", thousands=(",",), minus="minus", percent="percent", range_word="to", day_first=False,
    month_names=("January", "February", "March", "April", "May", "June", "July", "August", "September",
                 "October", "November", "December"),
    titles={"Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "Prof.": "Professor",
            "Mt.": "Mount", "No.": "number", "Jr.": "Junior", "Sr.": "Senior"},
    abbreviations={"e.g.": "for example", "i.e.": "that is", "etc.": "et cetera", "vs.": "versus",
                   "approx.": "approximately", "Inc.": "Incorporated", "Ltd.": "Limited", "Co.": "Company",
                   "a.m.": "a m", "p.m.": "p m", "Ave.": "Avenue"},
    units={"km/h": ("kilometer per hour", "kilometers per hour"), "mph": ("mile per hour", "miles per hour"),
           "km": ("kilometer", "kilometers"), "cm": ("centimeter", "centimeters"),
           "mm": ("millimeter", "millimeters"), "m": ("meter", "meters"), "kg": ("kilogram", "kilograms"),
           "mg": ("milligram", "milligrams"), "g": ("gram", "grams"), "lb": ("pound", "pounds"),
           "°C": ("degree Celsius", "degrees Celsius"), "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
           "kWh": ("kilowatt hour", "kilowatt hours"), "GB": ("gigabyte", "gigabytes"),
           "MB": ("megabyte", "megabytes"), "ms": ("millisecond", "milliseconds")},
    currencies=_CURRENCIES, ordinal_suffix=r"st|nd|rd|th",
)

DE = LanguageRules(
    code="de", decimal=",", thousands=(".",), minus="minus", percent="Prozent", range_word="bis",
    month_names=("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
                 "November", "Dezember"),
    titles={"Dr.": "Doktor", "Prof.": "Professor", "Hr.": "Herr", "Fr.": "Frau", "Nr.": "Nummer",
            "St.": "Sankt"},
    abbreviations={"z.B.": "zum Beispiel", "z. B.": "zum Beispiel", "d.h.": "das heißt", "d. h.": "das heißt",
                   "usw.": "und so weiter", "bzw.": "beziehungsweise", "ca.": "circa", "evtl.": "eventuell",
                   "ggf.": "gegebenenfalls", "inkl.": "inklusive", "u.a.": "unter anderem", "vgl.": "vergleiche"},
    units={"km/h": ("Kilometer pro Stunde", "Kilometer pro Stunde"), "km": ("Kilometer", "Kilometer"),
           "cm": ("Zentimeter", "Zentimeter"), "mm": ("Millimeter", "Millimeter"), "m": ("Meter", "Meter"),
           "kg": ("Kilogramm", "Kilogramm"), "mg": ("Milligramm", "Milligramm"), "g": ("Gramm", "Gramm"),
           "°C": ("Grad Celsius", "Grad Celsius"), "kWh": ("Kilowattstunde", "Kilowattstunden"),
           "GB": ("Gigabyte", "Gigabyte"), "MB": ("Megabyte", "Megabyte")},
    currencies=_CURRENCIES, ordinal_suffix=r"\.(?=\s+(?:Januar|Februar|März|April|Mai|Juni|Juli|August|September|"
                                           r"Oktober|November|Dezember)\b)",
)

FR = LanguageRules(
    code="fr", decimal=",", thousands=(" ", "\u202f", "\u00a0"), minus="moins", percent="pour cent",
    range_word="à",
    month_names=("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
                 "novembre", "décembre"),
    titles={"M.": "Monsieur", "MM.": "Messieurs", "Mme": "Madame", "Mlle": "Mademoiselle", "Dr": "Docteur",
            "Pr": "Professeur", "St": "Saint", "Ste": "Sainte", "n°": "numéro"},
    abbreviations={"etc.": "et cetera", "p. ex.": "par exemple", "c.-à-d.": "c'est-à-dire", "env.": "environ"},
    units={"km/h": ("kilomètre heure", "kilomètres heure"), "km": ("kilomètre", "kilomètres"),
           "cm": ("centimètre", "centimètres"), "mm": ("millimètre", "millimètres"), "m": ("mètre", "mètres"),
           "kg": ("kilogramme", "kilogrammes"), "mg": ("milligramme", "milligrammes"), "g": ("gramme", "grammes"),
           "°C": ("degré Celsius", "degrés Celsius"), "kWh": ("kilowattheure", "kilowattheures"),
           "Go": ("gigaoctet", "gigaoctets"), "Mo": ("mégaoctet", "mégaoctets")},
    currencies=_CURRENCIES, ordinal_suffix=r"er|re|ère|ème|eme|e",
)

ES = LanguageRules(
    code="es", decimal=",", thousands=(".",), minus="menos", percent="por ciento", range_word="a",
    month_names=("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
                 "noviembre", "diciembre"),
    titles={"Sr.": "señor", "Sra.": "señora", "Srta.": "señorita", "Dr.": "doctor", "Dra.": "doctora",
            "Ud.": "usted", "Uds.": "ustedes", "núm.": "número", "Núm.": "número"},
    abbreviations={"etc.": "etcétera", "p. ej.": "por ejemplo", "aprox.": "aproximadamente",
                   "EE. UU.": "Estados Unidos", "EE.UU.": "Estados Unidos"},
    units={"km/h": ("kilómetro por hora", "kilómetros por hora"), "km": ("kilómetro", "kilómetros"),
           "cm": ("centímetro", "centímetros"), "mm": ("milímetro", "milímetros"), "m": ("metro", "metros"),
           "kg": ("kilogramo", "kilogramos"), "mg": ("miligramo", "miligramos"), "g": ("gramo", "gramos"),
           "°C": ("grado Celsius", "grados Celsius"), "kWh": ("kilovatio hora", "kilovatios hora"),
           "GB": ("gigabyte", "gigabytes"), "MB": ("megabyte", "megabytes")},
    currencies=_CURRENCIES, ordinal_suffix=r"\.?º|\.?ª|\.?°",
)

FULL = {rules.code: rules for rules in (EN, DE, FR, ES)}

# Words of the languages that get numbers only, for "minus" (num2words reads negatives itself).
_DECIMAL_COMMA = {"it", "pt", "nl", "pl", "ru", "uk", "cs", "sk", "sl", "ro", "tr", "da", "sv", "no", "fi", "hu",
                  "lt", "lv", "ca", "be", "sr", "id", "kz", "az"}


def numbers_only(code: str) -> LanguageRules:
    """Rules for a language with no table: numbers in its own words, the decimal sign it writes."""
    comma = code.split("_")[0] in _DECIMAL_COMMA
    return LanguageRules(code=code, decimal="," if comma else ".", thousands=(), full=False)
