"""Language codes and the English names OpenAI's verbose_json uses for them (one table).

``stt serve`` answers with names, as OpenAI does; the http engine maps a service's names back to
codes.
"""

LANGUAGE_NAMES: dict[str, str] = {
    "en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
    "pt": "portuguese", "nl": "dutch", "pl": "polish", "ru": "russian", "uk": "ukrainian",
    "cs": "czech", "sv": "swedish", "da": "danish", "no": "norwegian", "fi": "finnish",
    "tr": "turkish", "el": "greek", "ar": "arabic", "he": "hebrew", "hi": "hindi",
    "ja": "japanese", "zh": "chinese", "ko": "korean", "vi": "vietnamese", "th": "thai",
    "id": "indonesian", "ms": "malay", "ro": "romanian", "hu": "hungarian", "ca": "catalan",
}

LANGUAGE_CODES: dict[str, str] = {name: code for code, name in LANGUAGE_NAMES.items()}
