"""The dev SMTP sink: accepts every message and keeps it in a Maildir for people to read."""

from __future__ import annotations

import argparse
import asyncio
import mailbox
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class MaildirHandler:
    def __init__(self, path: Path) -> None:
        for folder in ("tmp", "new", "cur"):  # also when `path` exists but is empty
            (path / folder).mkdir(parents=True, exist_ok=True)
        self.maildir = mailbox.Maildir(path, create=False)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        self.maildir.add(content if isinstance(content, bytes) else content.encode())
        return "250 Message accepted for delivery"


def start_sink(host: str, port: int, maildir: Path) -> Controller:
    controller = Controller(MaildirHandler(maildir), hostname=host, port=port)
    controller.start()
    return controller


async def _serve_forever(host: str, port: int, maildir: Path) -> None:
    controller = start_sink(host, port, maildir)
    print(f"mail sink on {host}:{port}, keeping messages in {maildir}/new", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--maildir", type=Path, default=Path(".data/mail"))
    args = parser.parse_args()
    try:
        asyncio.run(_serve_forever(args.host, args.port, args.maildir))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
