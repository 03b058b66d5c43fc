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
  const FATAL_CLOSES = new Set([1003, 1008, 1009, 4001]);
  const TYPING_SEND_MS = 2000; // the server drops more than one per 2 s anyway
  const TYPING_SHOW_MS = 5000;
  const QUICK_REACTIONS = ["👍", "❤️", "😂"];

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), state: $("state"), replica: $("replica"), joinForm: $("join"),
    name: $("name"), room: $("room"), title: $("room-title"), messages: $("messages"),
    count: $("online-count"), users: $("users"), sendForm: $("send"), text: $("text"),
    sendButton: document.querySelector("#send button"), notice: $("notice"),
    typing: $("typing"), rooms: $("rooms"), editing: $("editing"),
  };

  const chat = {
    name: "", room: "", ws: null, lastId: null, seen: new Set(), users: new Set(),
    attempt: 0, timer: null, pending: new Map(), clientSeq: 0, generation: 0,
    typers: new Map(), lastTyping: 0, editing: null, lastRead: null, sentRead: null,
    reactions: new Map(), dividerDone: false, roomsLoaded: false,
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
    const reactions = document.createElement("span");
    reactions.className = "reactions";
    li.append(who, text, meta, reactions);
    if (frame.id) decorate(li, frame, mine);
    return li;
  }

  // Edited mark, deleted state, reactions and the buttons (keyboard reachable) of one message.
  function decorate(li, frame, mine) {
    if (frame.deleted) { markDeleted(li); return; }
    if (frame.edited_ts) markEdited(li);
    if (frame.reactions) {
      chat.reactions.set(frame.id, new Map(
        Object.entries(frame.reactions).map(([emoji, users]) => [emoji, new Set(users)]),
      ));
    }
    renderReactions(li);
    if (li.querySelector(".actions")) return;
    const actions = document.createElement("span");
    actions.className = "actions";
    for (const emoji of QUICK_REACTIONS) {
      actions.append(button(`React ${emoji}`, emoji, () => toggleReaction(li.dataset.id, emoji)));
    }
    if (mine) {
      actions.append(button("Edit message", "Edit", () => startEdit(li)));
      const del = button("Delete message", "Delete", () => deleteMessage(li, del));
      actions.append(del);
    }
    li.append(actions);
  }

  function button(label, text, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "small";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  function markEdited(li) {
    if (li.querySelector(".edited")) return;
    const mark = document.createElement("span");
    mark.className = "edited";
    mark.textContent = "(edited)";
    li.querySelector(".meta").append(" ", mark);
  }

  function markDeleted(li) {
    li.classList.add("deleted");
    li.querySelector(".text").textContent = "message deleted";
    li.querySelector(".reactions").replaceChildren();
    li.querySelector(".actions")?.remove();
    if (chat.editing === li.dataset.id) stopEdit();
  }

  function renderReactions(li) {
    const box = li.querySelector(".reactions");
    const byEmoji = chat.reactions.get(li.dataset.id) || new Map();
    box.replaceChildren(...[...byEmoji].filter(([, users]) => users.size).map(([emoji, users]) => {
      const chip = button(`${emoji} by ${[...users].join(", ")}`, `${emoji} ${users.size}`,
        () => toggleReaction(li.dataset.id, emoji));
      chip.classList.add("reaction");
      if (users.has(chat.name)) chip.classList.add("on");
      return chip;
    }));
  }

  function itemById(id) {
    return ui.messages.querySelector(`li[data-id="${CSS.escape(id)}"]`);
  }

  function applyReaction(target, emoji, user, on) {
    const byEmoji = chat.reactions.get(target) || new Map();
    chat.reactions.set(target, byEmoji);
    const users = byEmoji.get(emoji) || new Set();
    byEmoji.set(emoji, users);
    if (on) users.add(user); else users.delete(user);
    const li = itemById(target);
    if (li) renderReactions(li);
  }

  function applyChange(frame) {
    const li = itemById(frame.target);
    if (!li) return;
    if (frame.type === "edit") {
      li.querySelector(".text").textContent = frame.text;
      markEdited(li);
    } else if (frame.type === "delete") {
      markDeleted(li);
    } else if (frame.type === "reaction") {
      applyReaction(frame.target, frame.emoji, frame.user, frame.on);
    }
  }

  function sendFrame(body) {
    if (!chat.ws || chat.ws.readyState !== WebSocket.OPEN) return false;
    chat.ws.send(JSON.stringify(body));
    return true;
  }

  function toggleReaction(target, emoji) {
    const users = chat.reactions.get(target)?.get(emoji);
    const on = !(users && users.has(chat.name));
    if (sendFrame({ type: "react", target, emoji, on })) applyReaction(target, emoji, chat.name, on);
  }

  function startEdit(li) {
    chat.editing = li.dataset.id;
    ui.text.value = li.querySelector(".text").textContent;
    ui.editing.textContent = "Editing your message: Enter saves, Escape cancels.";
    ui.text.focus();
  }

  function stopEdit() {
    chat.editing = null;
    ui.editing.textContent = "";
    ui.text.value = "";
  }

  // Two steps, both by keyboard or pointer: the first press asks, the second deletes.
  function deleteMessage(li, del) {
    if (!del.classList.contains("armed")) {
      del.classList.add("armed");
      del.textContent = "Really delete?";
      del.setAttribute("aria-label", "Confirm delete");
      return;
    }
    if (sendFrame({ type: "delete", id: li.dataset.id })) markDeleted(li);
  }

  // -- typing -----------------------------------------------------------------------------------
  function showTyping(user) {
    clearTimeout(chat.typers.get(user));
    chat.typers.set(user, setTimeout(() => { chat.typers.delete(user); renderTyping(); }, TYPING_SHOW_MS));
    renderTyping();
  }

  function renderTyping() {
    const users = [...chat.typers.keys()].sort();
    ui.typing.textContent = users.length ? `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing` : "";
  }

  // -- read markers, the "new since you left" divider, unread badges ------------------------------
  function placeDivider() {
    if (chat.dividerDone || !chat.lastRead) return;
    const first = [...ui.messages.querySelectorAll("li[data-id]")].find(
      (li) => idLess(chat.lastRead, li.dataset.id) && !li.classList.contains("mine"));
    if (!first) return;
    chat.dividerDone = true;
    const divider = document.createElement("li");
    divider.className = "divider";
    divider.setAttribute("role", "separator");
    divider.textContent = "new since you left";
    first.before(divider);
  }

  function markRead() {
    // Not before the marker we left with is known: the divider is placed from it.
    if (!chat.lastId || document.hidden || !chat.roomsLoaded) return;
    if (chat.sentRead && !idLess(chat.sentRead, chat.lastId)) return;
    if (sendFrame({ type: "read", id: chat.lastId })) chat.sentRead = chat.lastId;
  }

  async function loadRooms(generation) {
    try {
      const body = await getJSON(`/api/me/rooms?username=${encodeURIComponent(chat.name)}`);
      if (generation !== chat.generation) return;
      const here = body.rooms.find((r) => r.room === chat.room);
      if (!chat.roomsLoaded) {
        chat.roomsLoaded = true;
        if (here) chat.lastRead = here.last_read;
        placeDivider();
        markRead();
      }
      ui.rooms.replaceChildren(...body.rooms.map((r) => {
        const li = document.createElement("li");
        const a = document.createElement("a");
        a.href = `#${r.room}`;
        a.textContent = r.room;
        if (r.room === chat.room) a.setAttribute("aria-current", "page");
        li.append(a);
        if (r.room !== chat.room && r.unread > 0) {
          const badge = document.createElement("span");
          badge.className = "badge";
          badge.textContent = r.unread >= 1000 ? "999+" : String(r.unread);
          badge.setAttribute("aria-label", `${r.unread} unread`);
          li.append(" ", badge);
        }
        return li;
      }));
    } catch (err) {
      console.warn("rooms", err);
    }
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
    placeDivider();
    markRead();
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
    decorate(item.li, { id }, true);
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
        loadRooms(generation);
        break;
      case "message":
        addMessage(frame);
        break;
      case "ack":
        if (frame.client_id) confirm(frame.client_id, frame.id);
        break;
      case "edit":
      case "delete":
      case "reaction":
        if (chat.seen.has(frame.id)) break;
        chat.seen.add(frame.id);
        if (!chat.lastId || idLess(chat.lastId, frame.id)) chat.lastId = frame.id;
        applyChange(frame);
        break;
      case "typing":
        if (frame.user !== chat.name) showTyping(frame.user);
        break;
      case "read":
        if (frame.room === chat.room) chat.sentRead = frame.id;
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
      typers: new Map(), editing: null, lastRead: null, sentRead: null, reactions: new Map(),
      dividerDone: false, roomsLoaded: false,
    });
    ui.typing.textContent = "";
    ui.editing.textContent = "";
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
    if (chat.editing) {
      const li = itemById(chat.editing);
      if (sendFrame({ type: "edit", id: chat.editing, text }) && li) {
        li.querySelector(".text").textContent = text;
        markEdited(li);
      }
      stopEdit();
      return;
    }
    chat.clientSeq += 1;
    const clientId = `c${chat.clientSeq}`;
    chat.ws.send(JSON.stringify({ type: "message", text, client_id: clientId }));
    const li = messageItem({ user: chat.name, text }, true);
    li.classList.add("unconfirmed");
    chat.pending.set(clientId, { text, li });
    follow(() => ui.messages.append(li));
    ui.text.value = "";
  });

  ui.text.addEventListener("input", () => {
    const now = Date.now();
    if (chat.editing || !ui.text.value || now - chat.lastTyping < TYPING_SEND_MS) return;
    if (sendFrame({ type: "typing" })) chat.lastTyping = now;
  });
  ui.text.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && chat.editing) stopEdit();
    // Up arrow in an empty box edits your last message, as in Slack and Discord.
    if (event.key === "ArrowUp" && !ui.text.value) {
      const mine = [...ui.messages.querySelectorAll("li.mine[data-id]:not(.deleted)")].pop();
      if (mine) { event.preventDefault(); startEdit(mine); }
    }
  });
  document.addEventListener("visibilitychange", markRead);
  setInterval(() => { if (chat.ws) loadRooms(chat.generation); }, 10000);

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
