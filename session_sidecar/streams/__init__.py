"""Following a run: the resume route, Server-Sent Events, and the hub behind both (docs/streams.md)."""
