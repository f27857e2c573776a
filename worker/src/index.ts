// The edge worker (Hono on Cloudflare Workers) is built by its own issue; this package exists so
// the workspace layout is in place.
export {};
