#!/usr/bin/env python3
"""A recording workspace for tests/edge_strictness.rs.

Listens on 127.0.0.1:<port> and writes every request it reads, as it read it, to
record.jsonl in its working folder: one JSON line per request with the connection number, the
request's index on that connection, its head exactly as received (latin-1) and its body
decoded from the framing it was sent with. It reads strictly: a head with a bare LF, a body
framed by both Content-Length and Transfer-Encoding, or a malformed chunk is recorded as
such ("error") and the connection is closed. Bytes that arrive where no request can start
(frames sent before a 101) are recorded as "raw".

What it answers is chosen by the path (the proxy strips /i-<id>):
  /answer/<name>   a canned answer from ANSWERS, written exactly as listed
  /late            200, then unsolicited bytes on the same connection 300 ms later
                   (recorded as "late" once sent)
  /close-after-read  on a connection that served a request before: read it, then close
                     without answering; otherwise 200 "answered"
  /ws              a 101, then echoes what arrives, recording it as "tunnel"
  anything else    200 with the request's index as the body
"""
import json
import socket
import sys
import threading
import time

ANSWERS = {
    "bare-lf-head": b"HTTP/1.1 200 OK\nContent-Length: 5\nX-A: 1\n\nhello",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "bare-lf-trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-T: a\nHTTP/1.1 200 OK\r\n\r\n",
    "junk-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5 junk\r\nhello\r\n0\r\n\r\n",
    "folded": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Folded: a\r\n b\r\n\r\nhello",
    "conflicting-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cookie-space": b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Path =/; HttpOnly\r\n"
    b"Content-Length: 2\r\n\r\nok",
    "cookie-binary": b"HTTP/1.1 200 OK\r\nSet-Cookie: s=\xff\xfe; Path=/\r\nSet-Cookie: t=2\r\n"
    b"Content-Length: 2\r\n\r\nok",
    "cookie-last-path": b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Path=/%(prefix)s/; Path=/\r\n"
    b"Content-Length: 2\r\n\r\nok",
    "cookie-nameless": b"HTTP/1.1 200 OK\r\nSet-Cookie: nameless; Path=/\r\n"
    b"Content-Length: 2\r\n\r\nok",
    "refuse-ws": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\nrefused",
}

PORT = int(sys.argv[1])
PREFIX = sys.argv[2] if len(sys.argv) > 2 else ""
LOCK = threading.Lock()
CONNECTIONS = [0]


def record(entry):
    with LOCK:
        with open("record.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


class Closed(Exception):
    pass


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def more(self):
        data = self.sock.recv(65536)
        if not data:
            raise Closed()
        self.buf += data

    def until(self, marker):
        while marker not in self.buf:
            if len(self.buf) > 1 << 20:
                raise Closed()
            self.more()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def take(self, n):
        while len(self.buf) < n:
            self.more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def looks_like_request(buf):
    start = buf.split(b" ", 1)[0]
    return start.isalpha() and start.isupper()


def serve(sock, cid):
    reader = Reader(sock)
    index = 0
    try:
        while True:
            if not reader.buf:
                reader.more()
            if not looks_like_request(reader.buf):
                record({"conn": cid, "index": index, "raw": reader.buf.decode("latin-1")})
                return
            head = reader.until(b"\r\n\r\n")
            entry = {"conn": cid, "index": index, "head": head.decode("latin-1")}
            lines = head[:-4].split(b"\r\n")
            if any(b"\n" in line or b"\r" in line for line in lines):
                entry["error"] = "bare CR or LF in the head"
                record(entry)
                return
            method, target, _version = lines[0].decode("latin-1").split(" ", 2)
            headers = []
            for line in lines[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name.lower(), value.strip()))
            names = [n for n, _ in headers]
            if "content-length" in names and "transfer-encoding" in names:
                entry["error"] = "both Content-Length and Transfer-Encoding"
                record(entry)
                return
            body = b""
            if "transfer-encoding" in names:
                entry["framing"] = "chunked"
                while True:
                    size_line = reader.until(b"\r\n")[:-2]
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        while reader.until(b"\r\n") != b"\r\n":
                            pass
                        break
                    body += reader.take(size)
                    if reader.take(2) != b"\r\n":
                        entry["error"] = "malformed chunk"
                        record(entry)
                        return
            elif "content-length" in names:
                entry["framing"] = "length"
                body = reader.take(int(dict(headers)["content-length"]))
            entry["method"] = method
            entry["target"] = target
            entry["body"] = body.decode("latin-1")
            record(entry)
            if reader.buf and not looks_like_request(reader.buf):
                # Bytes behind the head that are no request (frames sent before a 101):
                # recorded before answering, so a client holding the answer can look.
                record({"conn": cid, "index": index, "raw": reader.buf.decode("latin-1")})
            path = target.split("?", 1)[0]
            if path.startswith("/answer/"):
                name = path[len("/answer/"):]
                answer = ANSWERS[name]
                if b"%(prefix)s" in answer:
                    answer = answer.replace(b"%(prefix)s", PREFIX.encode())
                sock.sendall(answer)
                if name == "refuse-ws":
                    index += 1
                    continue
            elif path == "/late":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
                time.sleep(0.3)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
                record({"conn": cid, "index": index, "late": True})
            elif path == "/close-after-read" and index > 0:
                return
            elif path == "/ws":
                sock.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n"
                )
                if reader.buf:
                    record({"conn": cid, "tunnel": reader.buf.decode("latin-1")})
                    sock.sendall(reader.buf)
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    record({"conn": cid, "tunnel": data.decode("latin-1")})
                    sock.sendall(data)
            else:
                text = ("answered %d" % index).encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
            index += 1
    except (Closed, OSError, ValueError, KeyError):
        return
    finally:
        sock.close()


def main():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", PORT))
    listener.listen(128)
    while True:
        sock, _ = listener.accept()
        with LOCK:
            CONNECTIONS[0] += 1
            cid = CONNECTIONS[0]
        threading.Thread(target=serve, args=(sock, cid), daemon=True).start()


if __name__ == "__main__":
    main()
