# nbdmirror-server image. Multi-stage: build (TypeScript + the fs-ext and mmap-io native addons) → small runtime.
# Configuration is through NBDMIRROR_* variables (every flag has one); data lives in the /data volume.
# The pmem region lives in /dev/shm (a tmpfs), which Docker sizes at 64 MiB by default: run with
# --shm-size larger than --pmem-size (e.g. `docker run --shm-size=512m …`), or the server refuses to start
# with "not enough space for the pmem region".

FROM node:20-bookworm-slim AS build
WORKDIR /app
# fs-ext and @riaskov/mmap-io are native addons: node-gyp needs python3, make and a C++ compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-fund --no-audit
COPY tsconfig.json tsconfig.build.json server.ts client.ts ./
COPY lib ./lib
RUN npm run build && npm prune --omit=dev --no-fund --no-audit

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    NBDMIRROR_LISTEN=0.0.0.0:10809 \
    NBDMIRROR_HTTP=0.0.0.0:9810 \
    NBDMIRROR_DATA_DIR=/data \
    NBDMIRROR_PMEM_DIR=/dev/shm
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
RUN mkdir -p /data && chown node:node /data \
 && ln -s /app/dist/server.js /usr/local/bin/nbdmirror-server \
 && ln -s /app/dist/client.js /usr/local/bin/nbdmirror \
 && chmod +x /app/dist/server.js /app/dist/client.js
USER node
VOLUME ["/data"]
EXPOSE 10809 9810
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "require('http').get('http://127.0.0.1:9810/healthz',r=>process.exit(r.statusCode===200?0:1)).on('error',()=>process.exit(1))"]
ENTRYPOINT ["node", "/app/dist/server.js"]
