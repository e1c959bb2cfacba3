#!/usr/bin/env python3
"""A slow stand-in for the Gormic REST API, for `scripts/limits`: an asyncio
HTTP/1.1 keep-alive server that answers every request, after a fixed delay,
with the CloseInvoice success envelope, and counts what it saw.

It binds two ports on 127.0.0.1, picked by the kernel, and prints one line
`listening <api port> <stats port>` on stdout once both accept connections.
On the API port every request is delayed `--delay` seconds, then answered
200. On the stats port (separate, so that reading the counts never counts as
a connection of the API port) `GET /stats` answers at once with JSON:
requests received and answered, requests whose client closed the connection
before the answer (`requests_abandoned`), connections of the API port open
now, at most at once and in all, requests being delayed now and at most at
once, and the requests by method and path. The final counts are printed on
stdout at exit (SIGTERM, SIGINT).

It holds thousands of connections at once: one coroutine each, and a listen
backlog of 4096 so that a burst of connects is not dropped.
"""

import argparse
import asyncio
import json
import signal
import sys

BODY = (
    b'{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1",'
    b'"data":{"invoiceNumber":1043,"invoiceSource":"POS","invoicedAt":"2026-11-25T10:00:00Z"}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
MAX_HEAD = 64 * 1024


class Stats:
    def __init__(self):
        self.received = 0
        self.answered = 0
        self.connections = 0
        self.max_connections = 0
        self.connections_total = 0
        self.delayed = 0
        self.max_delayed = 0
        self.routes = {}
        self.bad_requests = 0
        self.abandoned = 0

    def as_json(self):
        return json.dumps(
            {
                "requests_received": self.received,
                "requests_answered": self.answered,
                "connections_open": self.connections,
                "max_connections": self.max_connections,
                "connections_total": self.connections_total,
                "requests_delayed_now": self.delayed,
                "max_requests_delayed": self.max_delayed,
                "routes": self.routes,
                "bad_requests": self.bad_requests,
                "requests_abandoned": self.abandoned,
            }
        ).encode()


def parse_head(head):
    """(method, path, content length) of a request head, or None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    length = 0
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
        elif name.strip().lower() == b"transfer-encoding":
            return None  # the gateway sends Content-Length; chunked is not served
    return parts[0].decode(errors="replace"), parts[1].decode(errors="replace"), length


async def serve(reader, writer, stats, delay, stats_port=False):
    if not stats_port:
        stats.connections += 1
        stats.connections_total += 1
        stats.max_connections = max(stats.max_connections, stats.connections)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError:
                stats.bad_requests += 1
                return
            parsed = parse_head(head[:-4])
            if parsed is None:
                stats.bad_requests += 1
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            method, path, length = parsed
            if length:
                try:
                    await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    return
            if stats_port:
                if method != "GET" or path != "/stats":
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                body = stats.as_json()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
                continue
            stats.received += 1
            route = f"{method} {path}"
            stats.routes[route] = stats.routes.get(route, 0) + 1
            stats.delayed += 1
            stats.max_delayed = max(stats.max_delayed, stats.delayed)
            try:
                # Wait by reading, not sleeping: a client that gives up
                # (its timeout) closes the connection, and a sleeping server
                # would count it as open until the delay ends.
                early = await asyncio.wait_for(reader.read(1), delay)
            except TimeoutError:
                early = None
            finally:
                stats.delayed -= 1
            if early is not None:
                if early:
                    stats.bad_requests += 1  # pipelined: the gateway never does that
                else:
                    stats.abandoned += 1
                return
            writer.write(RESPONSE)
            await writer.drain()
            stats.answered += 1
    except ConnectionError:
        return  # the peer went away; nothing to answer
    finally:
        if not stats_port:
            stats.connections -= 1
        writer.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, required=True, help="seconds before each answer")
    args = parser.parse_args()
    if not args.delay >= 0:
        parser.error("--delay must be a number of seconds, 0 or more")
    stats = Stats()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, stats, args.delay), "127.0.0.1", 0, backlog=4096, limit=MAX_HEAD
    )
    stats_server = await asyncio.start_server(
        lambda r, w: serve(r, w, stats, 0, stats_port=True), "127.0.0.1", 0, limit=MAX_HEAD
    )
    port = server.sockets[0].getsockname()[1]
    port_stats = stats_server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening {port} {port_stats}", flush=True)
    await stop.wait()
    # Not `wait_closed()`: since Python 3.12 it waits for every keep-alive
    # connection to close; asyncio.run cancels their coroutines instead.
    server.close()
    stats_server.close()
    print(stats.as_json().decode(), flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except OSError as error:
        print(f"slow_upstream: {error}", file=sys.stderr)
        sys.exit(2)
