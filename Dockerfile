# One image with every Dispatch binary; compose.yaml picks the binary per service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim
COPY --from=build /src/target/release/dispatch /src/target/release/dispatch-* /usr/local/bin/
WORKDIR /workspace
