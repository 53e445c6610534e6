"""A slowloris attack on a status page, for its tests and its benchmark (on loopback)."""
from __future__ import annotations

import socket
import threading


class Slowloris(threading.Thread):
    """`count` connections from `sources`, each sending one more byte of a request head every
    second and never finishing it; one that is closed is opened again at once."""

    def __init__(self, port: int, sources, count: int, path: str = "/status"):
        super().__init__(daemon=True)
        self.port, self.sources, self.count, self.path = port, list(sources), count, path
        self.stop = threading.Event()
        self.opened = self.closed = 0

    def open(self, i):
        source = self.sources[i % len(self.sources)]
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))
            sock.sendall(f"GET {self.path} HTTP/1.1\r\n".encode())
            sock.setblocking(False)
            self.opened += 1
            return sock
        except OSError:
            return None

    def run(self) -> None:
        socks = [self.open(i) for i in range(self.count)]
        while not self.stop.wait(1.0):
            for i, sock in enumerate(socks):
                try:
                    if sock is None:
                        raise OSError
                    try:
                        if sock.recv(65536) == b"":
                            raise OSError  # the server closed it
                    except BlockingIOError:
                        pass
                    sock.send(b"X")
                except OSError:
                    if sock is not None:
                        sock.close()
                        self.closed += 1
                    socks[i] = self.open(i)
        for sock in socks:
            if sock is not None:
                sock.close()
