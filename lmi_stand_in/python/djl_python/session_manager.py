"""LMI's session manager (djl_python/session_manager.py at the commit the package doc names).

- ``__init__`` (lines 75-94): ``sessions_expiration`` (default 1200 s), a CloudWatch client
  (``aws/cloud_watch``: fails without an AWS region), ``sessions_path``, and the sessions already
  in that folder, held in a dict.
- ``create_session`` (lines 96-110): removes expired sessions, then makes a uuid folder that
  records its expiry time.
- ``get_session`` (lines 112-126): None for no id or ``NEW_SESSION``; raises ValueError for an id
  it does not hold; None for an expired one.
- ``close_session`` (lines 128-138): raises ValueError for no id or an unknown one.
The stand-in records the expiry as JSON where LMI pickles it (no pickle from disk here).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid

from djl_python.aws.cloud_watch import CloudWatch

EXPIRY_FILE = ".expiration_ts"


class Session:
    def __init__(self, session_id: str, root: str, expiration_ts: float | None = None):
        self.session_id = session_id
        self.files_path = os.path.join(root, session_id)
        self.expiration_ts = expiration_ts if expiration_ts is not None else self._stored()

    def _stored(self) -> float | None:
        path = os.path.join(self.files_path, EXPIRY_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            return float(json.load(handle))

    def store(self) -> None:
        os.makedirs(self.files_path)
        with open(os.path.join(self.files_path, EXPIRY_FILE), "w") as handle:
            json.dump(self.expiration_ts, handle)

    def remove(self) -> bool:
        if not os.path.exists(self.files_path):
            raise ValueError(f"session directory does not exist: {self.session_id}")
        shutil.rmtree(self.files_path)
        return True


class SessionManager:
    def __init__(self, properties: dict):
        self.expiration = int(properties.get("sessions_expiration", str(20 * 60)))
        self.cloud_watch = CloudWatch()
        default = os.path.join(tempfile.gettempdir(), "djl_sessions")
        self.sessions_path = properties.get("sessions_path", default)
        os.makedirs(self.sessions_path, exist_ok=True)
        self.sessions = {sid: Session(sid, self.sessions_path)
                         for sid in os.listdir(self.sessions_path)}

    def create_session(self) -> Session:
        self._clean_expired_session()
        session = Session(str(uuid.uuid4()), self.sessions_path, time.time() + self.expiration)
        self.sessions[session.session_id] = session
        session.store()
        self.cloud_watch.post("create_session")
        return session

    def get_session(self, session_id: str | None) -> Session | None:
        if session_id == "NEW_SESSION" or not session_id:
            return None
        if session_id not in self.sessions:
            raise ValueError(f"session not found: {session_id}")
        session = self.sessions[session_id]
        if session.expiration_ts is not None and time.time() > session.expiration_ts:
            return None
        return session

    def close_session(self, session_id: str | None) -> None:
        if not session_id:
            raise ValueError(f"invalid session_id: {session_id}")
        if session_id not in self.sessions:
            raise ValueError(f"session not found: {session_id}")
        if self.sessions[session_id].remove():
            self.cloud_watch.post("close_session")
        del self.sessions[session_id]

    def _clean_expired_session(self) -> None:
        for session_id, session in list(self.sessions.items()):
            if session.expiration_ts is None or time.time() > session.expiration_ts:
                self.close_session(session_id)
