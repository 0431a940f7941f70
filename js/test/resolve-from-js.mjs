// A module resolution hook: bare imports ("react", "ai"…) made by modules outside js/
// (api/static/fanline-react.js, docs examples) resolve to js/node_modules, as
// a user's bundler or import map would resolve them to their app's copy.
// Registered with module.register() by the tests that need it.
export async function resolve(specifier, context, nextResolve) {
  const bare = !specifier.startsWith(".") && !specifier.startsWith("/") && !specifier.includes(":");
  if (bare && context.parentURL && !context.parentURL.includes("/js/")) {
    return nextResolve(specifier, { ...context, parentURL: import.meta.url });
  }
  return nextResolve(specifier, context);
}
