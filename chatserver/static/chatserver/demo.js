/* Integreat chat demo client: plain JavaScript, no build, no dependencies.
 *
 * Speaks the WebSocket protocol of the wire contract (section 3): history on connect, chat.send
 * with a client_id (resent with the same id after a reconnect, which never duplicates), chat.ack,
 * chat.status, chat.typing, error frames, and a ping every 20 s. After a close it reconnects with
 * ?after=<highest id seen> and an exponential backoff. When the socket cannot connect while HTTP
 * answers (a proxy without WebSockets, say), it falls back to REST polling (section 2: GET with
 * ?after and If-None-Match, POST as a form) and keeps probing the socket in the background.
 *
 * Message content arrives as HTML that the server has already escaped (device text) or sanitised
 * (counsellor and bot HTML), so it is inserted as HTML; everything else is inserted as text.
 */
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("demo-config").textContent);
  const DEVICE_KEY = "integreat-chat-demo-device";
  const DEVICE_ID = /^[-a-zA-Z0-9_]{1,64}$/;
  const PERMANENT_CLOSES = {
    4400: "The server refused this device id or path (close code 4400).",
    4404: "This region does not exist (close code 4404).",
    4503: "No chat server is configured for this region (close code 4503).",
  };
  const MAX_BACKOFF_MS = 10000;
  const FAILURES_BEFORE_FALLBACK = 3;
  const POLL_INTERVAL_MS = 2000;
  const SOCKET_PROBE_INTERVAL_MS = 30000;
  const STATUS_RANK = {pending: 1, sent: 2, failed: 2};

  const $ = (id) => document.getElementById(id);
  const ui = {
    connection: $("connection"),
    identity: $("identity"),
    alert: $("alert"),
    messages: $("messages"),
    empty: $("empty"),
    typing: $("typing"),
    composer: $("composer"),
    input: $("message-input"),
    deviceInput: $("device-input"),
    newDevice: $("new-device"),
    console: $("console-frame"),
  };

  // --- device id ------------------------------------------------------------------------------

  function randomHex(bytes) {
    const values = new Uint8Array(bytes);
    crypto.getRandomValues(values); // unlike randomUUID, also there on plain http LAN addresses
    return Array.from(values, (value) => value.toString(16).padStart(2, "0")).join("");
  }

  function loadStoredDevice() {
    try {
      return localStorage.getItem(DEVICE_KEY);
    } catch (error) {
      return null; // storage disabled: a fresh id per page load
    }
  }

  function storeDevice(id) {
    try {
      localStorage.setItem(DEVICE_KEY, id);
    } catch (error) {
      /* storage disabled */
    }
  }

  let device = config.device || loadStoredDevice();
  if (!device || !DEVICE_ID.test(device)) {
    device = "demo-" + randomHex(12);
  }
  storeDevice(device);
  ui.deviceInput.value = device;
  document.body.dataset.device = device;
  ui.identity.textContent =
    "Region " + config.region + " · language " + config.language + " · device " + device;

  ui.newDevice.addEventListener("click", () => {
    storeDevice("demo-" + randomHex(12));
    const query = new URLSearchParams({region: config.region, language: config.language});
    window.location.search = query.toString();
  });

  // --- state ----------------------------------------------------------------------------------

  const messagesById = new Map(); // id -> <li>
  const outbox = new Map(); // client_id -> {text, element, state: "sending"|"queued"|"error"}
  let highestId = 0;
  const frames = []; // every frame received, for debugging and the browser test
  window.demoClient = {frames, device, outbox, messagesById, get highestId() { return highestId; }};

  // --- rendering ------------------------------------------------------------------------------

  function formatTime(iso) {
    const date = new Date(iso);
    return isNaN(date) ? "" : date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }

  function statusText(status) {
    return {
      sending: "sending…",
      queued: "waiting for the connection…",
      pending: "stored, on its way to the counselling service",
      sent: "sent",
      failed: "failed: the counselling service refused it",
    }[status] || status;
  }

  function bubble(role, automatic) {
    const element = document.createElement("li");
    element.className = "message " + role + (automatic ? " automatic" : "");
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : automatic ? "Bot" : "Counsellor";
    const content = document.createElement("div");
    content.className = "content";
    content.dir = "auto";
    const meta = document.createElement("div");
    meta.className = "meta";
    const time = document.createElement("time");
    const status = document.createElement("span");
    status.className = "status";
    meta.append(time, status);
    element.append(who, content, meta);
    return element;
  }

  function setStatus(element, status, detail) {
    const current = element.dataset.status;
    // A late "pending" (an ack that lost the race with chat.status) never undoes a final status.
    if (status === "pending" && STATUS_RANK[current] > STATUS_RANK.pending) {
      return;
    }
    element.dataset.status = status;
    if (!element.classList.contains("user")) {
      return;
    }
    const node = element.querySelector(".status");
    node.textContent = detail ? "not sent: " + detail + " " : statusText(status);
    if (status === "error") {
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "retry";
      retry.textContent = "Retry";
      retry.addEventListener("click", () => retrySend(element.dataset.clientId));
      node.append(retry);
    }
  }

  function fill(element, message) {
    element.dataset.id = String(message.id);
    element.classList.toggle("automatic", Boolean(message.automatic_answer));
    // Server HTML: device text escaped, counsellor and bot HTML sanitised (wire contract, 2).
    element.querySelector(".content").innerHTML = message.content;
    const time = element.querySelector("time");
    time.dateTime = message.created_at;
    time.textContent = formatTime(message.created_at);
    let list = element.querySelector(".attachments");
    if (list) {
      list.remove();
    }
    if (message.attachments && message.attachments.length) {
      list = document.createElement("ul");
      list.className = "attachments";
      for (const attachment of message.attachments) {
        const link = document.createElement("a");
        link.href = attachment.url;
        link.textContent = "📎 " + attachment.name;
        link.rel = "noopener";
        link.target = "_blank";
        const item = document.createElement("li");
        item.append(link);
        list.append(item);
      }
      element.querySelector(".content").after(list);
    }
    setStatus(element, message.status);
  }

  function place(element, id) {
    // Ordered by id; local messages not yet stored stay at the end.
    for (const other of ui.messages.children) {
      if (other === element) {
        continue;
      }
      if (!other.dataset.id || Number(other.dataset.id) > id) {
        ui.messages.insertBefore(element, other);
        return;
      }
    }
    ui.messages.append(element);
  }

  function upsert(message) {
    let element = messagesById.get(message.id);
    const own = message.client_id && outbox.get(message.client_id);
    if (!element && own) {
      element = own.element; // our own send, stored: the local bubble becomes the message
      outbox.delete(message.client_id);
    }
    if (!element) {
      element = bubble(message.role, message.automatic_answer);
    }
    if (!messagesById.has(message.id)) {
      messagesById.set(message.id, element);
      fill(element, message);
      place(element, message.id);
    } else {
      fill(element, message);
    }
    highestId = Math.max(highestId, message.id);
    updateEmpty();
  }

  function mergeMessages(messages) {
    keepScrolled(() => {
      for (const message of messages) {
        upsert(message);
      }
    });
  }

  function keepScrolled(change, always) {
    // Follow new messages when the reader is at the bottom (or sent one), not when reading back.
    const list = ui.messages;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 48;
    change();
    if (always || atBottom) {
      list.scrollTop = list.scrollHeight;
    }
  }

  function updateEmpty() {
    ui.empty.hidden = ui.messages.children.length > 0;
  }

  function setTyping(typing) {
    ui.typing.hidden = !typing;
    document.body.dataset.botTyping = typing ? "true" : "false";
  }

  function setConnection(state, text) {
    ui.connection.dataset.state = state;
    ui.connection.textContent = text;
    document.body.dataset.connection = state;
  }

  function showAlert(text) {
    ui.alert.textContent = text;
    ui.alert.hidden = false;
  }

  function clearAlert() {
    ui.alert.hidden = true;
    ui.alert.textContent = "";
  }

  // --- sending --------------------------------------------------------------------------------

  function newClientId() {
    return "c-" + Date.now().toString(36) + "-" + randomHex(8);
  }

  function queueSend(text) {
    const clientId = newClientId();
    const element = bubble("user", false);
    element.dataset.clientId = clientId;
    element.querySelector(".content").textContent = text; // local echo: our own text, as text
    keepScrolled(() => ui.messages.append(element), true);
    updateEmpty();
    const entry = {text, element, state: "sending"};
    outbox.set(clientId, entry);
    setStatus(element, "sending");
    transmit(clientId, entry);
  }

  function transmit(clientId, entry) {
    if (mode === "rest") {
      postMessage(clientId, entry);
    } else if (socket && socket.readyState === WebSocket.OPEN && socketReady) {
      entry.state = "sending";
      setStatus(entry.element, "sending");
      socket.send(JSON.stringify({type: "chat.send", client_id: clientId, message: entry.text}));
    } else {
      entry.state = "queued";
      setStatus(entry.element, "queued");
    }
  }

  function flushOutbox() {
    // Unacknowledged sends go again with the same client_id: the server never stores one twice.
    for (const [clientId, entry] of outbox) {
      if (entry.state !== "error") {
        transmit(clientId, entry);
      }
    }
  }

  function retrySend(clientId) {
    const entry = outbox.get(clientId);
    if (entry) {
      transmit(clientId, entry);
    }
  }

  function sendFailed(clientId, detail, retryAfterSecs) {
    const entry = outbox.get(clientId);
    if (!entry) {
      return;
    }
    entry.state = "error";
    setStatus(entry.element, "error", detail);
    if (retryAfterSecs) {
      setTimeout(() => retrySend(clientId), retryAfterSecs * 1000);
    }
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim()) {
      return;
    }
    ui.input.value = "";
    queueSend(text);
    ui.input.focus();
  });

  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });

  // --- WebSocket ------------------------------------------------------------------------------

  let mode = config.transport === "rest" ? "rest" : "socket";
  let socket = null;
  let socketReady = false; // history received: the socket is caught up
  let failures = 0; // consecutive connection attempts that failed or dropped
  let httpAnsweredBefore = false;
  let reconnectTimer = null;
  let pingTimer = null;
  let awaitingPong = false;
  let stopped = false;

  function socketUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const after = highestId ? "?after=" + highestId : "";
    return (
      scheme + "//" + window.location.host + config.wsPath + encodeURIComponent(device) + "/" + after
    );
  }

  function connectSocket() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (error) {
      socketFailed(false, 1006);
      return;
    }
    socket = ws;
    let opened = false;
    ws.addEventListener("open", () => {
      opened = true;
      startPing(ws);
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      handleFrame(frame);
    });
    ws.addEventListener("close", (event) => {
      if (socket !== ws) {
        return;
      }
      socket = null;
      socketReady = false;
      stopPing();
      socketFailed(opened, event.code);
    });
  }

  function backoffMs() {
    const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.max(0, failures - 1));
    return Math.round(base * (0.75 + Math.random() * 0.5));
  }

  async function socketFailed(opened, code) {
    if (stopped) {
      return;
    }
    if (PERMANENT_CLOSES[code]) {
      setConnection("closed", "disconnected");
      showAlert(PERMANENT_CLOSES[code]);
      stopped = true;
      return;
    }
    if (mode === "rest") {
      // A background probe failed: stay on polling, probe again later.
      reconnectTimer = setTimeout(connectSocket, SOCKET_PROBE_INTERVAL_MS);
      return;
    }
    failures = opened ? 1 : failures + 1;
    if (!opened && failures >= FAILURES_BEFORE_FALLBACK) {
      // The socket keeps failing. If HTTP answers meanwhile (twice, around one more try, so a
      // server that is just starting up is not mistaken for one without WebSockets), poll.
      const httpUp = await restReachable();
      if (httpUp && httpAnsweredBefore) {
        httpAnsweredBefore = false;
        startPolling("WebSocket unavailable: polling over REST");
        reconnectTimer = setTimeout(connectSocket, SOCKET_PROBE_INTERVAL_MS);
        return;
      }
      httpAnsweredBefore = httpUp;
      if (httpUp) {
        connectSocket();
        return;
      }
    }
    const delay = Math.max(backoffMs(), code === 4429 ? 5000 : 0);
    setConnection("reconnecting", "reconnecting…");
    ui.connection.title = "next attempt in " + (delay / 1000).toFixed(1) + " s";
    for (const entry of outbox.values()) {
      if (entry.state === "sending") {
        entry.state = "queued";
        setStatus(entry.element, "queued");
      }
    }
    reconnectTimer = setTimeout(connectSocket, delay);
  }

  function startPing(ws) {
    stopPing();
    awaitingPong = false;
    pingTimer = setInterval(() => {
      if (ws.readyState !== WebSocket.OPEN) {
        return;
      }
      if (awaitingPong) {
        ws.close(4000, "no pong"); // the connection is dead without the browser noticing
        return;
      }
      awaitingPong = true;
      ws.send(JSON.stringify({type: "ping"}));
    }, config.pingIntervalMs);
  }

  function stopPing() {
    clearInterval(pingTimer);
    pingTimer = null;
  }

  function handleFrame(frame) {
    frames.push(frame.type);
    switch (frame.type) {
      case "chat.history":
        mergeMessages(frame.messages);
        highestId = Math.max(highestId, frame.last_id || 0);
        setTyping(frame.chatbot_typing);
        failures = 0;
        httpAnsweredBefore = false;
        socketReady = true;
        if (mode === "rest") {
          stopPolling();
        }
        mode = "socket";
        if (ui.connection.dataset.state === "reconnecting" && ui.console) {
          // The server may have restarted, and `manage.py demo` with it a fake Zammad on a new
          // port: reload the console through the page's redirect to wherever it is now.
          ui.console.src = ui.console.getAttribute("src");
        }
        setConnection("open", "connected");
        ui.connection.title = "";
        clearAlert();
        flushOutbox();
        refreshPending();
        break;
      case "chat.message":
        keepScrolled(() => upsert(frame.message));
        break;
      case "chat.ack": {
        const entry = outbox.get(frame.client_id);
        if (entry) {
          outbox.delete(frame.client_id);
          if (messagesById.has(frame.id)) {
            // Already shown (history after a reconnect carries no client_id): drop the echo.
            entry.element.remove();
          } else {
            messagesById.set(frame.id, entry.element);
            entry.element.dataset.id = String(frame.id);
            place(entry.element, frame.id);
            highestId = Math.max(highestId, frame.id);
          }
        }
        const element = messagesById.get(frame.id);
        if (element) {
          setStatus(element, frame.status);
        }
        break;
      }
      case "chat.status": {
        const element = messagesById.get(frame.id);
        if (element) {
          setStatus(element, frame.status);
        }
        break;
      }
      case "chat.typing":
        setTyping(frame.chatbot_typing);
        break;
      case "error": {
        const retry = frame.retry_after ? " (retry in " + frame.retry_after + " s)" : "";
        showAlert("Error " + frame.code + ": " + frame.detail + retry);
        if (frame.client_id) {
          sendFailed(frame.client_id, frame.detail, frame.retry_after);
        }
        break;
      }
      case "pong":
        awaitingPong = false;
        break;
      default:
        break; // unknown frames are ignored, as the contract allows new ones
    }
  }

  // --- REST fallback --------------------------------------------------------------------------

  let pollTimer = null;
  let etag = null;
  let polling = false;

  function restUrl() {
    return config.apiPath + encodeURIComponent(device) + "/";
  }

  async function restReachable() {
    try {
      const response = await fetch(restUrl(), {cache: "no-store"});
      return response.status < 500 || response.status === 503;
    } catch (error) {
      return false;
    }
  }

  function startPolling(text) {
    mode = "rest";
    setConnection("polling", text);
    if (!polling) {
      polling = true;
      poll();
    }
    flushOutbox();
  }

  function stopPolling() {
    polling = false;
    clearTimeout(pollTimer);
    pollTimer = null;
  }

  function pollAfter() {
    // Pending messages may still change status: poll from just before the oldest of them.
    let after = highestId;
    for (const [id, element] of messagesById) {
      if (element.dataset.status === "pending" && id - 1 < after) {
        after = id - 1;
      }
    }
    return after;
  }

  async function refreshPending() {
    // The history after a reconnect starts after the highest id seen, so status changes of older
    // pending messages (missed while away) come from one REST read from just before them.
    const after = pollAfter();
    if (after >= highestId) {
      return;
    }
    try {
      const response = await fetch(restUrl() + "?after=" + after, {cache: "no-store"});
      if (response.status === 200) {
        mergeMessages((await response.json()).messages);
      }
    } catch (error) {
      /* the socket's pushes carry on; the next reconnect tries again */
    }
  }

  async function poll() {
    if (!polling) {
      return;
    }
    try {
      const after = pollAfter();
      const headers = etag ? {"If-None-Match": etag} : {};
      const response = await fetch(restUrl() + (after ? "?after=" + after : ""), {
        headers,
        cache: "no-store",
      });
      if (response.status === 200) {
        etag = response.headers.get("ETag");
        const body = await response.json();
        mergeMessages(body.messages);
        setTyping(body.chatbot_typing);
      } else if (response.status === 304 || response.status === 404) {
        /* nothing new, or no chat yet */
      } else {
        await restError(response, null);
      }
      if (mode === "rest" && ui.connection.dataset.state !== "polling") {
        setConnection("polling", "polling over REST");
      }
      flushQueuedPosts();
    } catch (error) {
      setConnection("reconnecting", "reconnecting…");
    }
    if (polling) {
      pollTimer = setTimeout(poll, POLL_INTERVAL_MS);
    }
  }

  function flushQueuedPosts() {
    for (const [clientId, entry] of outbox) {
      if (entry.state === "queued") {
        postMessage(clientId, entry);
      }
    }
  }

  async function restError(response, clientId) {
    let detail = "HTTP " + response.status;
    try {
      detail = (await response.json()).error || detail;
    } catch (error) {
      /* not JSON */
    }
    const retryAfter = Number(response.headers.get("Retry-After")) || 0;
    showAlert("Error " + response.status + ": " + detail);
    if (clientId) {
      sendFailed(clientId, detail, retryAfter);
    }
  }

  async function postMessage(clientId, entry) {
    entry.state = "sending";
    setStatus(entry.element, "sending");
    const form = new FormData();
    form.append("message", entry.text);
    form.append("client_id", clientId);
    let response;
    try {
      response = await fetch(restUrl(), {method: "POST", body: form});
    } catch (error) {
      entry.state = "queued"; // the next poll tries again, with the same client_id
      setStatus(entry.element, "queued");
      return;
    }
    if (response.status !== 200) {
      await restError(response, clientId);
      return;
    }
    const body = await response.json();
    etag = response.headers.get("ETag");
    // REST answers carry no client_id: the stored message is in the conversation, so the local
    // bubble gives way to it.
    outbox.delete(clientId);
    entry.element.remove();
    mergeMessages(body.messages);
    setTyping(body.chatbot_typing);
  }

  // --- start ----------------------------------------------------------------------------------

  window.addEventListener("online", () => {
    if (mode === "socket" && !socket && !stopped) {
      connectSocket(); // the network is back: no need to wait for the backoff
    }
  });

  updateEmpty();
  setTyping(false);
  if (mode === "rest") {
    startPolling("polling over REST (transport=rest)");
  } else {
    setConnection("connecting", "connecting…");
    connectSocket();
  }
})();
