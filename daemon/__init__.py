"""dsnode: one daemon per host serving DeepSeek-R1-class models over the OpenAI API."""

__version__ = "0.1.0"
