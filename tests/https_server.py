"""A real HTTPS server for poulpe's TLS task tests (Python's http.server and ssl, trustme).

Makes a CA and a certificate for 127.0.0.1/localhost with trustme, writes DIR/ca.pem (the CA
that signed the server's certificate) and DIR/other-ca.pem (a CA that signed nothing here),
listens on 127.0.0.1 on a free port and prints `READY <port>`. Every GET is answered 200 with
the body `tls-ok <path>`.
"""
import argparse
import http.server
import os
import ssl
import sys

import trustme


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"tls-ok {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("https_server: " + (fmt % args) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tls-dir", required=True)
    a = p.parse_args()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(os.path.join(a.tls_dir, "ca.pem"))
    trustme.CA().cert_pem.write_to_path(os.path.join(a.tls_dir, "other-ca.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"READY {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
