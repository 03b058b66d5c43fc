// The Chorus chat page: plain JavaScript, no build step. It talks to the same origin it was
// served from, so behind the load balancer a reconnect may land on any replica.
"use strict";

(() => {
  const NAME_RE = /^[A-Za-z0-9_.-]{1,32}$/;
  const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
  const HISTORY = 50;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  // Close codes after which reconnecting cannot help: the page would only repeat the mistake.
  const FATAL_CLOSES = new Set([1003, 1008, 1009]);

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), state: $("state"), replica: $("replica"), joinForm: $("join"),
    name: $("name"), room: $("room"), title: $("room-title"), messages: $("messages"),
    count: $("online-count"), users: $("users"), sendForm: $("send"), text: $("text"),
    sendButton: document.querySelector("#send button"), notice: $("notice"),
  };

  const chat = {
    name: "", room: "", ws: null, lastId: null, seen: new Set(), users: new Set(),
    attempt: 0, timer: null, pending: new Map(), clientSeq: 0, generation: 0,
  };

  // -- ids ----------------------------------------------------------------------------------
  const parseId = (id) => id.split("-").map(Number);
  const idLess = (a, b) => {
    const [am, as] = parseId(a);
    const [bm, bs] = parseId(b);
    return am < bm || (am === bm && as < bs);
  };

  // -- rendering: text goes in with textContent, never as HTML -------------------------------
  function setState(state, detail) {
    ui.status.dataset.state = state;
    ui.state.textContent = detail ? `${state} (${detail})` : state;
    const live = state === "connected";
    ui.text.disabled = !live;
    ui.sendButton.disabled = !live;
  }

  function notice(text) { ui.notice.textContent = text || ""; }

  function messageItem(frame, mine) {
    const li = document.createElement("li");
    if (frame.id) li.dataset.id = frame.id;
    if (mine) li.classList.add("mine");
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = frame.user;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = frame.text;
    const meta = document.createElement("span");
    meta.className = "meta";
    if (frame.ts) {
      const time = document.createElement("time");
      const when = new Date(frame.ts * 1000);
      time.dateTime = when.toISOString();
      time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      meta.append(time);
    }
    li.append(who, text, meta);
    return li;
  }

  function follow(render) {
    const list = ui.messages;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    render();
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  // Insert in id order: a resync reload and replayed frames may arrive interleaved.
  function addMessage(frame) {
    if (!frame.id || chat.seen.has(frame.id)) return;
    chat.seen.add(frame.id);
    if (!chat.lastId || idLess(chat.lastId, frame.id)) chat.lastId = frame.id;
    const mine = frame.user === chat.name;
    if (mine && reconcile(frame)) return;
    follow(() => {
      const li = messageItem(frame, mine);
      let after = ui.messages.lastElementChild;
      while (after && (!after.dataset.id || idLess(frame.id, after.dataset.id))) {
        after = after.previousElementSibling;
      }
      if (after) after.after(li);
      else ui.messages.prepend(li);
    });
  }

  // One of our own messages came back in a replay: if it is one we saw as unconfirmed,
  // confirm that item instead of showing the text twice.
  function reconcile(frame) {
    for (const [clientId, item] of chat.pending) {
      if (item.text === frame.text && item.li.classList.contains("unconfirmed")) {
        confirm(clientId, frame.id);
        return true;
      }
    }
    return false;
  }

  function confirm(clientId, id) {
    const item = chat.pending.get(clientId);
    if (!item) return;
    chat.pending.delete(clientId);
    chat.seen.add(id);
    item.li.dataset.id = id;
    item.li.classList.remove("unconfirmed");
    const meta = item.li.querySelector(".meta");
    meta.textContent = "";
    // Our own messages come back as acks, without a timestamp: the id's milliseconds are one.
    const time = document.createElement("time");
    const when = new Date(parseId(id)[0]);
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    meta.append(time);
  }

  function renderUsers() {
    ui.users.replaceChildren(
      ...[...chat.users].sort().map((user) => {
        const li = document.createElement("li");
        li.textContent = user === chat.name ? `${user} (you)` : user;
        return li;
      }),
    );
  }

  // -- HTTP -----------------------------------------------------------------------------------
  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store" });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  async function loadPresence(generation) {
    try {
      const body = await getJSON(`/api/rooms/${chat.room}/presence`);
      if (generation !== chat.generation) return;
      chat.users = new Set(body.users);
      ui.count.textContent = String(body.online);
      renderUsers();
    } catch (err) {
      console.warn("presence", err);
    }
  }

  async function reloadHistory(generation) {
    try {
      const body = await getJSON(`/api/rooms/${chat.room}/history?limit=${HISTORY}`);
      if (generation !== chat.generation) return;
      body.messages.forEach(addMessage);
    } catch (err) {
      console.warn("history", err);
    }
  }

  // -- the socket -----------------------------------------------------------------------------
  function connect() {
    clearTimeout(chat.timer);
    chat.timer = null;
    if (!navigator.onLine) {
      setState("offline", "no network");
      return;
    }
    const params = new URLSearchParams({ username: chat.name });
    if (chat.lastId) params.set("since", chat.lastId);
    else params.set("history", String(HISTORY));
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws/${chat.room}?${params}`);
    const generation = chat.generation;
    chat.ws = ws;
    setState(chat.attempt ? "reconnecting" : "connecting");
    ws.onmessage = (event) => {
      if (chat.ws !== ws) return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      onFrame(frame, generation);
    };
    ws.onclose = (event) => {
      if (chat.ws !== ws) return;
      chat.ws = null;
      onClosed(event.code);
    };
  }

  function onFrame(frame, generation) {
    switch (frame.type) {
      case "welcome":
        chat.attempt = 0;
        ui.replica.textContent = frame.replica;
        ui.count.textContent = String(frame.online);
        setState("connected");
        notice("");
        loadPresence(generation);
        break;
      case "message":
        addMessage(frame);
        break;
      case "ack":
        confirm(frame.client_id, frame.id);
        break;
      case "presence":
        // One diff per room per interval; a big room sends only its count (the list is then
        // stale, so it is fetched again once the room is small enough to send names).
        ui.count.textContent = String(frame.online);
        if (!frame.joins && !frame.leaves) {
          chat.usersStale = true;
          break;
        }
        if (chat.usersStale) {
          chat.usersStale = false;
          loadPresence(generation);
          break;
        }
        (frame.joins || []).forEach((user) => chat.users.add(user));
        (frame.leaves || []).forEach((user) => chat.users.delete(user));
        renderUsers();
        break;
      case "resync":
        // What we hold can no longer be resumed from: start over from the room's history.
        chat.seen.clear();
        chat.lastId = null;
        ui.messages.replaceChildren();
        notice("Reloaded the room's history: some older messages may have been skipped.");
        reloadHistory(generation);
        break;
      case "error":
        notice(frame.detail);
        if (frame.client_id) chat.pending.delete(frame.client_id);
        break;
      default:
        break;
    }
  }

  function onClosed(code) {
    // Sent but not acknowledged: we cannot know whether it was stored until the replay says.
    for (const item of chat.pending.values()) {
      item.li.querySelector(".meta").textContent = "not confirmed";
    }
    if (FATAL_CLOSES.has(code)) {
      setState("offline", `closed with ${code}`);
      return;
    }
    scheduleReconnect();
  }

  // Jittered exponential backoff: 1012 (draining) and 1013 (slow consumer) land here too.
  function scheduleReconnect() {
    if (!navigator.onLine) {
      setState("offline", "no network");
      return;
    }
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** chat.attempt);
    const delay = cap / 2 + Math.random() * (cap / 2);
    chat.attempt += 1;
    setState("reconnecting", `attempt ${chat.attempt} in ${(delay / 1000).toFixed(1)} s`);
    chat.timer = setTimeout(connect, delay);
  }

  window.addEventListener("online", () => { if (!chat.ws && chat.room) connect(); });
  window.addEventListener("offline", () => { if (!chat.ws) setState("offline", "no network"); });

  // -- joining and sending --------------------------------------------------------------------
  function join(name, room) {
    if (chat.ws) {
      const old = chat.ws;
      chat.ws = null;
      old.close(1000, "switching room");
    }
    chat.generation += 1;
    Object.assign(chat, {
      name, room, lastId: null, seen: new Set(), users: new Set(), attempt: 0, pending: new Map(),
    });
    localStorage.setItem("chorus.name", name);
    if (location.hash.slice(1) !== room) history.replaceState(null, "", `#${room}`);
    ui.title.textContent = `Messages in ${room}`;
    document.title = `${room} · Chorus`;
    ui.messages.replaceChildren();
    renderUsers();
    connect();
  }

  ui.joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.name.value.trim();
    const room = ui.room.value.trim();
    if (!NAME_RE.test(name) || !ROOM_RE.test(room)) {
      notice("Name and room: letters, digits, dot, dash or underscore.");
      return;
    }
    notice("");
    join(name, room);
    ui.text.focus();
  });

  ui.sendForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.text.value;
    if (!text.trim() || !chat.ws || chat.ws.readyState !== WebSocket.OPEN) return;
    chat.clientSeq += 1;
    const clientId = `c${chat.clientSeq}`;
    chat.ws.send(JSON.stringify({ type: "message", text, client_id: clientId }));
    const li = messageItem({ user: chat.name, text }, true);
    li.classList.add("unconfirmed");
    chat.pending.set(clientId, { text, li });
    follow(() => ui.messages.append(li));
    ui.text.value = "";
  });

  // A shared link's fragment names the room; changing it switches room.
  window.addEventListener("hashchange", () => {
    const room = decodeURIComponent(location.hash.slice(1));
    if (ROOM_RE.test(room) && room !== chat.room) {
      ui.room.value = room;
      if (chat.name) join(chat.name, room);
    }
  });

  const fromHash = decodeURIComponent(location.hash.slice(1));
  ui.room.value = ROOM_RE.test(fromHash) ? fromHash : "lobby";
  ui.name.value = localStorage.getItem("chorus.name") || `guest-${Math.random().toString(36).slice(2, 6)}`;
  setState("offline", "not joined");
  if (ROOM_RE.test(fromHash) && NAME_RE.test(ui.name.value)) join(ui.name.value, ui.room.value);
  else ui.name.focus();
})();
