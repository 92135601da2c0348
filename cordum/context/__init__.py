"""cordum-context-engine: `window` (the pure core: windows, trimming, governance, entry limits),
`memory` (its Redis reads and writes), `service` (gRPC + health, the process), `client` (Trio,
over every replica)."""
