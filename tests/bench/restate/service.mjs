// The Restate side of `cargo xtask bench --peer restate`: one service whose handler
// takes as many durable steps as a one-leaf Dispatch run records (plan, model turn,
// policy decision, tool call, gate), each a `ctx.run` journaled by restate-server.
// A second, plain HTTP port answers how many invocations have finished, so the bench
// can count completions without adding work to Restate's path.

// @restatedev/restate-sdk 1.17.2 calls Promise.withResolvers, which Node 20 lacks.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new this((yes, no) => {
      resolve = yes;
      reject = no;
    });
    return { promise, resolve, reject };
  };
}

const http = await import("node:http");
const http2 = await import("node:http2");
const restate = await import("@restatedev/restate-sdk");

const STEPS = ["plan", "model turn", "policy decision", "tool call", "gate"];
let finished = 0;

const bench = restate.service({
  name: "bench",
  handlers: {
    run: async (ctx, goal) => {
      for (const step of STEPS) {
        await ctx.run(step, () => `${step}: ${String(goal).length}`);
      }
      finished += 1;
      return "done";
    },
  },
});

const endpoint = http2.createServer(restate.createEndpointHandler({ services: [bench] }));
await new Promise((ready) => endpoint.listen(0, "127.0.0.1", ready));
const counter = http.createServer((_, response) => {
  response.writeHead(200, { "content-type": "application/json" });
  response.end(JSON.stringify({ finished }));
});
await new Promise((ready) => counter.listen(0, "127.0.0.1", ready));
console.log(JSON.stringify({ endpoint: endpoint.address().port, counter: counter.address().port }));
