import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: [`conformance.test.mjs`],
    // The suite sets its own per-test timeouts for long-poll tests; this is the default for the rest.
    testTimeout: 30_000,
    hookTimeout: 30_000,
    watch: false,
  },
})
