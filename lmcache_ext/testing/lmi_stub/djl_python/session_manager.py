"""LMI's session manager as its vLLM service uses it (see the package doc): a session is a
folder under ``sessions_path`` named by a uuid, with its creation time; expired ones are removed
when a session is created."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid

UUID_PATTERN = re.compile("[0-9a-f-]{36}")


class Session:
    def __init__(self, session_id: str, root: str):
        self.session_id = session_id
        self.files_path = os.path.join(root, session_id)

    def created(self) -> float:
        with open(os.path.join(self.files_path, ".creation_time")) as handle:
            return float(json.load(handle))


class SessionManager:
    def __init__(self, properties: dict[str, str]):
        self.expiration = int(properties.get("sessions_expiration", str(20 * 60)))
        default = os.path.join(tempfile.gettempdir(), "djl_sessions")
        self.sessions_path = properties.get("sessions_path", default)
        os.makedirs(self.sessions_path, exist_ok=True)

    def create_session(self) -> Session:
        self._clean_expired()
        session = Session(str(uuid.uuid4()), self.sessions_path)
        os.makedirs(session.files_path)
        with open(os.path.join(session.files_path, ".creation_time"), "w") as handle:
            json.dump(time.time(), handle)
        return session

    def get_session(self, session_id: str | None) -> Session | None:
        if not session_id or not UUID_PATTERN.match(session_id):
            raise ValueError(f"invalid session_id: {session_id}")
        session = Session(session_id, self.sessions_path)
        return session if os.path.exists(session.files_path) else None

    def close_session(self, session_id: str | None) -> None:
        if not session_id or not UUID_PATTERN.match(session_id):
            raise ValueError(f"invalid session_id: {session_id}")
        shutil.rmtree(os.path.join(self.sessions_path, session_id), ignore_errors=True)

    def _clean_expired(self) -> None:
        for session_id in os.listdir(self.sessions_path):
            session = Session(session_id, self.sessions_path)
            if time.time() - session.created() > self.expiration:
                self.close_session(session_id)
