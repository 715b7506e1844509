import { defineConfig } from "vitest/config"

// Same defaults as the package's own CLI runner (vitest defaults: 5 s per test unless the
// suite sets its own, as it does for long-poll and property tests). Override with
// CONFORMANCE_TEST_TIMEOUT_MS when debugging a slow server.
const testTimeout = process.env.CONFORMANCE_TEST_TIMEOUT_MS
  ? Number(process.env.CONFORMANCE_TEST_TIMEOUT_MS)
  : undefined

export default defineConfig({
  test: {
    include: [`conformance.test.mjs`],
    watch: false,
    ...(testTimeout ? { testTimeout, hookTimeout: testTimeout } : {}),
  },
})
