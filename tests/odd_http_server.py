"""An HTTP/1.1 server with odd but lawful framings (and some unlawful ones) for poulpe's HTTP
task tests; plain sockets, so every byte on the wire is the test's.

Listens on 127.0.0.1 on a free port and prints `READY <port>`. Each request is logged as
`<connection number> <method> <path>`; `GET /_log` answers the log, one line each. Paths:
- /chunked: a chunked body with chunk extensions and a trailer section,
- /close: a body without length, ended by closing the connection,
- /conn-close: `Connection: close` with a length, the connection left open (and still read),
- /big?n=N: N bytes of `a`,
- /interim: 100 and 103 interim answers before the final one,
- /malformed: a status line without a code,
- /redirect: 302 to /chunked,
- /redirect-rel: 302 to `chunked` (relative to the current path),
- /dir/up: 302 to `../chunked`,
- /redirect-query: 302 to `?x=1`; with a query, answers `query <query>`,
- /slow-read: the request body read 8 KiB every 20 ms (a small receive buffer), then `read`,
- /slow-body: half a body, then silence for 5 s,
- /drop-second: answered on a fresh connection; the second request on one is met with a close,
- /then-close: answered with a length, then the connection is closed.
"""
import socket
import sys
import threading
import time

LOG = []
LOCK = threading.Lock()
COUNT = [0]


def answer(body, status="200 OK", extra=""):
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def serve(conn, number):
    try:
        talk(conn, number)
    except OSError:
        # The client may drop a connection with unread bytes (a body it cut): a reset.
        conn.close()


def talk(conn, number):
    buf = b""
    seen = 0
    while True:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                conn.close()
                return
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if target == "/slow-read":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            got = len(buf)
            while got < length:
                data = conn.recv(8192)
                if not data:
                    conn.close()
                    return
                got += len(data)
                time.sleep(0.02)
            buf = b""
            length = 0
            LOG.append(f"{number} {method} {target}")
            conn.sendall(answer(b"read"))
            continue
        while len(buf) < length:
            buf += conn.recv(65536)
        buf = buf[length:]
        seen += 1
        path, _, query = target.partition("?")
        with LOCK:
            LOG.append(f"{number} {method} {path}")
            log = "\n".join(LOG).encode()
        if path == "/_log":
            conn.sendall(answer(log))
        elif path == "/chunked":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;name=value\r\nhello\r\n7\r\n chunks\r\n0;last\r\nX-Trailer: t\r\n\r\n"
            )
        elif path == "/close":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close")
            conn.close()
            return
        elif path == "/conn-close":
            conn.sendall(answer(b"closing", extra="Connection: close\r\n"))
        elif path == "/big":
            n = int(query.partition("n=")[2] or "100000")
            conn.sendall(answer(b"a" * n))
        elif path == "/interim":
            conn.sendall(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                + answer(b"final")
            )
        elif path == "/malformed":
            conn.sendall(b"HTTP/1.1 OK\r\n\r\n")
            conn.close()
            return
        elif path == "/redirect":
            conn.sendall(answer(b"", "302 Found", "Location: /chunked\r\n"))
        elif path == "/redirect-rel":
            conn.sendall(answer(b"", "302 Found", "Location: chunked\r\n"))
        elif path == "/dir/up":
            conn.sendall(answer(b"", "303 See Other", "Location: ../chunked\r\n"))
        elif path == "/redirect-query":
            if query:
                conn.sendall(answer(f"query {query}".encode()))
            else:
                conn.sendall(answer(b"", "302 Found", "Location: ?x=1\r\n"))
        elif path == "/slow-body":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
            time.sleep(5)
            conn.close()
            return
        elif path == "/then-close":
            conn.sendall(answer(b"bye"))
            conn.close()
            return
        elif path == "/drop-second" and seen >= 2:
            conn.close()
            return
        else:
            conn.sendall(answer(b"fine"))


def main():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    print(f"READY {s.getsockname()[1]}", flush=True)
    while True:
        conn, _ = s.accept()
        COUNT[0] += 1
        threading.Thread(target=serve, args=(conn, COUNT[0]), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
