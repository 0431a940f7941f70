// Helpers for the Node tests that talk to a real fanline stack (started by pytest:
// tests/web/test_js_client.py and tests/web/test_ai_sdk.py set FANLINE_URL and FANLINE_URL_2).
import assert from "node:assert/strict";
import net from "node:net";

export function baseUrl(n = 1) {
  const url = n === 1 ? process.env.FANLINE_URL : process.env.FANLINE_URL_2;
  assert.ok(url, "FANLINE_URL is not set: run these through pytest (tests/web/test_js_client.py, test_ai_sdk.py)");
  return url;
}

export async function generation(url, id) {
  const response = await fetch(`${url}/v1/generations/${id}`);
  assert.equal(response.status, 200, await response.clone().text());
  return response.json();
}

/** Resolves when `predicate()` is true, checked every time `subscribe` reports a change. */
export function until(subscribe, predicate, what = "the condition") {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`timed out waiting for ${what}`));
    }, 30000);
    const check = () => {
      if (predicate()) {
        clearTimeout(timer);
        stop();
        resolve();
      }
    };
    const stop = subscribe(check);
    check();
  });
}

/**
 * A TCP proxy in front of an API pod that cuts its first connection (the POST of a
 * chat) after `cutAfter` bytes of the response: a real dropped connection, in the
 * middle of a frame. Later connections pass through. `requests` holds each
 * connection's request head, to check what a reconnect sent.
 */
export async function cuttingProxy(target, { cutAfter }) {
  const upstreamUrl = new URL(target);
  const requests = [];
  const sockets = new Set();
  let connections = 0;
  let cut = false;
  const server = net.createServer((client) => {
    const n = connections++;
    const upstream = net.connect(Number(upstreamUrl.port), upstreamUrl.hostname);
    sockets.add(client).add(upstream);
    let head = "";
    client.on("data", (data) => {
      if (!head.includes("\r\n\r\n")) {
        head += data.toString("latin1");
        if (head.includes("\r\n\r\n")) requests.push(head.split("\r\n\r\n")[0]);
      }
      upstream.write(data);
    });
    let received = 0;
    upstream.on("data", (data) => {
      if (n === 0 && !cut) {
        received += data.length;
        if (received >= cutAfter) {
          cut = true;
          client.write(data.subarray(0, data.length - (received - cutAfter)));
          client.destroy();
          upstream.destroy();
          return;
        }
      }
      client.write(data);
    });
    upstream.on("end", () => client.end());
    client.on("end", () => upstream.end());
    upstream.on("error", () => client.destroy());
    client.on("error", () => upstream.destroy());
    client.on("close", () => sockets.delete(client));
    upstream.on("close", () => sockets.delete(upstream));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    get cut() {
      return cut;
    },
    close() {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

// console.error calls made during the tests, to assert there were none; react-test-renderer 19
// announces its own deprecation once, which is not collected.
export function collectConsoleErrors() {
  const consoleError = console.error;
  const logged = [];
  console.error = (...args) => {
    if (!String(args[0]).startsWith("react-test-renderer is deprecated")) logged.push(args);
  };
  process.on("exit", () => {
    console.error = consoleError;
  });
  return logged;
}
