"""voiceline: an anonymous one-on-one voice line over SIP."""

__version__ = "0.1.0"
