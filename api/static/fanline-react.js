// fanline-react.js — useFanlineChat(), a React hook over fanline.js's ChatSession.
//
// React is a peer: this module imports "react" and your app (its bundler, or an
// import map) provides it; nothing of React is bundled here. React 18 or later.
//
//   import { useFanlineChat } from "./fanline-react.js";
//   const { messages, status, send, stop, resume } = useFanlineChat({ body: { model: "demo" } });
//
// messages: [{ role, content }] with assistant messages also { id, reasoning, finishReason };
// status: "idle" | "connecting" | "live" | "reconnecting" | "done" | "error";
// send(text, extraBody?), stop() cancels the generation for every viewer,
// resume() picks the current generation up after its last event (after an error),
// resume(generationId, lastEventId?) follows any generation (a shared link).
// Unmounting stops reading but not the generation; remounting the same hook
// (React's StrictMode does that) resumes after the last event it had.
import { useEffect, useRef, useSyncExternalStore } from "react";

import { ChatSession } from "./fanline.js";

export function useFanlineChat(options = {}) {
  const ref = useRef(null);
  if (ref.current === null) ref.current = new ChatSession(options);
  const session = ref.current;
  session.options = { ...options }; // the latest callbacks and body, without a new session
  const snapshot = useSyncExternalStore(session.subscribe, session.getSnapshot, session.getSnapshot);
  useEffect(() => {
    session.attach();
    return () => session.detach();
  }, [session]);
  return {
    ...snapshot,
    send: session.send,
    stop: session.stop,
    resume: session.resume,
    session,
  };
}

export { ChatSession };
