"""A real SMTP server for poulpe's mail tests (aiosmtpd).

Writes each accepted mail to OUT/<n>.json ({mail_from, rcpt_tos, subject, body, raw}) and prints
READY once listening. Options: --auth USER:PASS requires AUTH; --tls-dir DIR makes a CA and a
certificate for 127.0.0.1/localhost with trustme, writes DIR/ca.pem and requires STARTTLS;
--implicit-tls DIR does the same but speaks TLS from the first byte (port 465 style);
--reject TEXT answers 550 to recipients containing TEXT; --tempfail N answers 451 to the first N
DATA commands (a transient failure; nothing is recorded for them).
"""
import argparse
import email
import email.header
import email.policy
import json
import os
import ssl
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, out, reject, tempfail):
        self.out = out
        self.reject = reject
        self.tempfail = tempfail
        self.n = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reject and self.reject in address:
            return "550 5.1.1 <%s>: mailbox unavailable" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.tempfail > 0:
            self.tempfail -= 1
            return "451 4.3.0 Try again later"
        self.n += 1
        raw = envelope.content.decode("utf-8", "replace")
        msg = email.message_from_string(raw, policy=email.policy.default)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "subject": str(msg["subject"]),
            "to_header": str(msg["to"]),
            "from_header": str(msg["from"]),
            "content_type": msg.get_content_type(),
            "body": msg.get_content(),
            "raw": raw,
            # STARTTLS sets session.ssl; implicit TLS shows on the transport.
            "tls": (session.ssl is not None
                    or server.transport.get_extra_info("ssl_object") is not None),
        }
        tmp = os.path.join(self.out, ".%d.tmp" % self.n)
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.out, "%d.json" % self.n))
        return "250 2.0.0 Ok: queued as TEST%d" % self.n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--auth")
    p.add_argument("--tls-dir")
    p.add_argument("--implicit-tls")
    p.add_argument("--reject")
    p.add_argument("--tempfail", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    kwargs = {}
    tls_dir = a.tls_dir or a.implicit_tls
    if tls_dir:
        import trustme
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        ca.cert_pem.write_to_path(os.path.join(tls_dir, "ca.pem"))
        if a.implicit_tls:
            kwargs.update(ssl_context=ctx)
        else:
            kwargs.update(tls_context=ctx, require_starttls=True)
    if a.auth:
        user, password = a.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword)
                  and auth_data.login.decode() == user
                  and auth_data.password.decode() == password)
            # handled=False: aiosmtpd itself answers 535 on a failure.
            return AuthResult(success=ok, handled=False)

        kwargs.update(authenticator=authenticator, auth_required=True,
                      auth_require_tls=bool(tls_dir))
    ctl = Controller(Handler(a.out, a.reject, a.tempfail), hostname="127.0.0.1", port=a.port, **kwargs)
    ctl.start()
    print("READY", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        ctl.stop()


if __name__ == "__main__":
    sys.exit(main())
