"""A scripted upstream on a real socket: answers `GET /cluster` with an advertisement, and each
`POST` with the next behaviour of its script (a good answer, a stream, a 5xx, a cut, silence), so the
forwarder's failure handling is tested byte for byte. HTTP/1.1 keep-alive, as a dsnode node speaks."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from dsnode.cluster.peer_auth import PeerAuth, PeerRefused

from tests.support.raw_http import content_length

MODEL = "remote-model"


@dataclass
class Received:
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        return None


@dataclass
class FakeUpstream:
    name: str
    script: list[str] = field(default_factory=list)  # behaviours for successive POSTs; then `otherwise`
    otherwise: str = "ok"
    model: str = MODEL  # the model it advertises
    version: str | None = None  # the model version it advertises and answers with (X-DSNode-Version)
    version_label: str | None = None
    tokenizer: str | None = None  # the digest it advertises for its model's tokenizer (None: it does not say)
    ready: bool = True
    max_context: int = 4096
    close_after_answer: bool = False  # close each connection after answering (stale keep-alive)
    received: list[Received] = field(default_factory=list)
    verifier: PeerAuth | None = None  # check X-DSNode-Peer as a node with a cluster secret does
    verified: list[str] = field(default_factory=list)  # the senders of the credentials it accepted
    connections: int = 0
    closed_by_peer: int = 0
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> "FakeUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_peer += 1
                    return
                body = await reader.readexactly(content_length(head))
                if not await self._credential_holds(writer, Received(head, body)):
                    continue
                if head.startswith(b"GET /cluster"):
                    await self._advert(writer)
                    continue
                self.received.append(Received(head, body))
                behaviour = self.script.pop(0) if self.script else self.otherwise
                keep = await getattr(self, "_" + behaviour.replace("-", "_"))(writer, reader)
                if not keep or self.close_after_answer:
                    writer.close()
                    return
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _credential_holds(self, writer: asyncio.StreamWriter, got: Received) -> bool:
        if self.verifier is None:
            return True
        method, path = got.head.split(b" ", 2)[:2]
        headers = {k: got.header(k) or "" for k in ("X-DSNode-Peer", "X-DSNode-Via", "X-DSNode-User",
                                                     "X-Request-Id")}
        try:
            self.verified.append(self.verifier.verify(method.decode(), path.decode(), headers))
            return True
        except PeerRefused as exc:
            body = json.dumps({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                         "code": "invalid_peer_credential"}}).encode()
            challenge = b"X-DSNode-Peer-Challenge: " + self.verifier.challenge.encode() + b"\r\n"
            await self._send(writer, 401, body, extra=challenge if exc.challenge else b"")
            return False

    # --- behaviours: return whether the connection stays open -----------------------------------
    async def _advert(self, writer: asyncio.StreamWriter) -> None:
        advert = {"node": {"name": self.name, "role": "central", "ready": self.ready,
                           "reason": "" if self.ready else "model is loading",
                           "models": [{"name": self.model, "max_context": self.max_context, "ready": self.ready,
                                       **self._version_fields(),
                                       **({"tokenizer": self.tokenizer} if self.tokenizer else {})}]},
                  "peers": []}
        await self._send(writer, 200, json.dumps(advert).encode())

    def _version_fields(self) -> dict[str, str]:
        if self.version is None:
            return {}
        return {"version": self.version, **({"version_label": self.version_label} if self.version_label else {})}

    def _version_header(self) -> bytes:
        return b"" if self.version is None else b"X-DSNode-Version: " + self.version.encode() + b"\r\n"

    async def _ok(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        body = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                           "choices": [{"index": 0, "text": f"from {self.name}", "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode()
        await self._send(writer, 200, body)
        return True

    async def _stream(
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, cut: bool = False, unterminated: bool = False
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"X-DSNode-Node: " + self.name.encode() + b"\r\n" + self._version_header() + b"\r\n")
        for i in range(3):
            event = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                                "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
            writer.write(_chunk(f"data: {event}\n\n".encode()))
            await writer.drain()
            await asyncio.sleep(0.01)
        if cut:
            writer.write(_chunk(b'data: {"half an ev'))  # an event cut in the middle, then nothing
            await writer.drain()
            return False
        writer.write(_chunk(b"data: [DONE]\n\n") + (b"" if unterminated else b"0\r\n\r\n"))
        await writer.drain()
        return not unterminated

    async def _chat(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        """A whole chat answer with reasoning, text and a tool call, as a dsnode central gives it."""
        message = {"role": "assistant", "content": f"from {self.name}", "reasoning_content": "thinking",
                   "tool_calls": [{"id": "call_7", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
        body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
                           "choices": [{"index": 0, "message": message, "logprobs": None,
                                        "finish_reason": "tool_calls"}],
                           "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                                     "prompt_tokens_details": {"cached_tokens": 4}}}).encode()
        await self._send(writer, 200, body)
        return True

    async def _not_chat(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        """200 with a body that is no chat completion (a broken or foreign upstream)."""
        await self._send(writer, 200, b'["not", "a", "completion"]')
        return True

    async def _chat_stream(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                           cut: bool = False) -> bool:
        """A chat stream: a role chunk, reasoning, text in pieces, the finish reason, usage, [DONE]."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"X-DSNode-Node: " + self.name.encode() + b"\r\n\r\n")
        deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "hmm"}, {"content": "fr"},
                  {"content": f"om {self.name}"}]
        for i, delta in enumerate(deltas):
            event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL, "usage": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            writer.write(_chunk(f"data: {json.dumps(event)}\n\n".encode()))
            await writer.drain()
            await asyncio.sleep(0.01)
        if cut:
            writer.write(_chunk(b'data: {"half an ev'))
            await writer.drain()
            return False
        last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL, "usage": None,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
        usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
                 "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
        writer.write(_chunk(f"data: {json.dumps(last)}\n\ndata: {json.dumps(usage)}\n\n".encode()))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _cut_chat_stream(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        return await self._chat_stream(writer, reader, cut=True)

    async def _done_then_hang_up(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        return await self._stream(writer, reader, unterminated=True)  # [DONE], then no last chunk

    async def _cut_stream(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        return await self._stream(writer, reader, cut=True)

    async def _cut_body(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
                     b"X-DSNode-Node: " + self.name.encode() + b"\r\n\r\n" + b'{"id": "cmpl-1", "cho')
        await writer.drain()
        return False

    async def _error_500(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        body = json.dumps({"error": {"message": f"{self.name} broke", "type": "server_error",
                                     "param": None, "code": "engine_error"}}).encode()
        await self._send(writer, 500, body)
        return True

    async def _busy_429(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        body = json.dumps({"error": {"message": "queue full", "type": "server_overloaded",
                                     "param": None, "code": "queue_full"}}).encode()
        await self._send(writer, 429, body, extra=b"Retry-After: 1\r\n")
        return True

    async def _hang(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        await reader.read()  # until the forwarder gives up and closes
        return False

    async def _hang_up(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        return False  # close without a word

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, extra: bytes = b"") -> None:
        reason = {200: b"OK", 401: b"Unauthorized", 429: b"Too Many Requests", 500: b"Internal Server Error",
                  502: b"Bad Gateway", 503: b"Service Unavailable"}[status]
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"X-DSNode-Node: %s\r\n%s%s\r\n" % (status, reason, len(body), self.name.encode(), extra,
                                                          self._version_header()) + body)
        await writer.drain()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
