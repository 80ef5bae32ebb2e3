"""`budgetlm serve`: an OpenAI-compatible HTTP server for runs and fine-tuned models.

app.py        the FastAPI application and the `serve` verb
engine.py     what is served: the model, its tokenizer, the chat template, classify/tag/embed
slots.py      the key/value cache whose rows are serving slots, each at its own position
scheduler.py  continuous batching: one decode step for every active sequence, admission between steps
text.py       per-sequence detokenisation, stop strings and logprobs
schemas.py    request bodies (strict: unknown fields are refused)
security.py   API keys (constant-time) and per-key rate limits
metrics.py    Prometheus metrics
page.html     the playground served at GET /
"""
