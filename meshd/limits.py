"""Every limit and timeout of the meshd protocol and daemon, in one place.

A peer that exceeds one gets an error naming the limit and, for framing limits, a closed
connection; the daemon itself keeps serving.
"""

#: Protocol version, exchanged in the handshake; peers with another version are refused with an
#: error naming both versions. Version 2 seals every frame after the handshake (meshd.wire.seal).
PROTOCOL_VERSION = 2

#: Frame format version, in every frame prefix (changes only if the framing itself changes).
FRAME_FORMAT = 1

#: First bytes of every frame.
MAGIC = b"FXMH"
#: First bytes of every sealed record (protocol 2, after the handshake).
SEALED_MAGIC = b"FXMS"

# --- framing -------------------------------------------------------------------------------------
#: Largest msgpack header of one frame.
MAX_HEADER_BYTES = 256 * 1024
#: Most binary segments (tensor buffers) one frame may carry.
MAX_SEGMENTS = 1024
#: Largest single segment: one activation chunk or a whole prediction.
MAX_SEGMENT_BYTES = 1 << 30
#: Largest total of one frame's segments.
MAX_FRAME_BYTES = 2 << 30
#: Largest msgpack container (array or map) inside a header.
MAX_HEADER_CONTAINER = 4096
#: Largest string or bytes value inside a header.
MAX_HEADER_STRING = 64 * 1024

# --- before authentication ---------------------------------------------------------------------
#: A frame received before the peer has proven the key may be at most this big (header only).
PREAUTH_MAX_FRAME_BYTES = 512
#: A connection holds its pre-auth slot at most this long: the daemon's side of the handshake (hello
#: in, challenge out, proof in) must be over within it, or the connection is closed. A key holder's
#: takes one and a half round trips (milliseconds on a LAN, well under a second over a VPN), while
#: anyone can send a valid hello without the key and then stall: this is how long such a connection
#: keeps a slot from a member, and 3 s keeps a member served within 5 s under a flood (its own
#: connect is retried with backoff meanwhile, CONNECT_RETRY_S).
PREAUTH_TIMEOUT_S = 3.0
#: A client gives up on a handshake after this long (it waits for a daemon that may be busy; the
#: daemon bounds its own side by PREAUTH_TIMEOUT_S).
HANDSHAKE_TIMEOUT_S = 10.0
#: At most this many connections may be in their handshake at once; more are closed at once.
MAX_PREAUTH_CONNECTIONS = 32
#: ... and at most this many of them from one source (an IPv4 address or an IPv6 /64), so that one
#: flooding host cannot lock the others out.
MAX_PREAUTH_PER_SOURCE = 8
#: At most this many authenticated connections at once.
MAX_CONNECTIONS = 64
#: The listening socket's queue of connections the kernel completed and the daemon has not accepted
#: yet. A full queue makes the kernel drop new SYNs, so a cluster member would wait out the TCP
#: retransmits behind a flood: with 128, a flood from 199 addresses that reconnect at once filled it
#: whenever the event loop paused (a member's connect then failed its 5 s in CI). Accepting and
#: refusing is cheap, so a deep queue costs only kernel memory; Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
#: At most this many requests run at once on one connection; more are answered ``busy`` (each request
#: may hold memory, e.g. a forward's input tensor). Above the generations one client may queue.
MAX_REQUESTS_PER_SESSION = 128

# --- sealing (after authentication) -----------------------------------------------------------
#: Largest plaintext of one sealed record: big segments are sealed and opened in pieces of this size,
#: so that the memory sealing needs stays bounded and sealing overlaps the transfer.
SEAL_RECORD_BYTES = 1 << 20
#: Each direction moves to a fresh key after this many records ...
REKEY_RECORDS = 1 << 24
#: ... or this many bytes, whichever comes first (well inside AES-GCM's usage limits per key).
REKEY_BYTES = 1 << 36
#: A sequence number past this would wrap the nonce: the connection ends before that.
MAX_RECORD_SEQUENCE = (1 << 64) - 1

# --- after authentication ----------------------------------------------------------------------
#: Once a frame has started, bytes must keep arriving: no progress for this long closes the link
#: (a slow-loris client cannot hold a connection open by trickling a frame).
FRAME_PROGRESS_TIMEOUT_S = 10.0
#: Every send must make progress: a peer that takes no byte of what we send for this long is lost
#: (its connection is closed, so that a client that stops reading cannot hold a generation's slot or
#: our memory for long). Shorter than PEER_SILENCE_TIMEOUT_S: a live peer's kernel takes bytes whenever
#: its process reads at all, and meshd reads every connection continuously, whatever it computes.
SEND_PROGRESS_TIMEOUT_S = 3.0
#: A send under that deadline goes out in slices of at most this many bytes, so the deadline measures
#: progress, not the time a whole piece takes: 64 KiB in 3 s is about 175 kbit/s, under any real link.
SEND_PROGRESS_SLICE = 64 * 1024
#: A connection with no frame at all for this long is closed (clients ping to stay alive).
IDLE_TIMEOUT_S = 600.0
#: A request to a peer that gets no answer at all within this long fails (a generation sets its own,
#: longer deadline for whole steps).
REQUEST_TIMEOUT_S = 60.0
#: A link on which no byte arrives for this long while a request on it is outstanding is
#: considered dead: the request fails with "peer-lost". Both ends ping every PING_INTERVAL_S
#: while busy, so a live peer is never this quiet.
PEER_SILENCE_TIMEOUT_S = 4.0
#: Interval of keep-alive pings while requests are outstanding.
PING_INTERVAL_S = 1.0
#: Connecting to a peer must succeed within this long.
CONNECT_TIMEOUT_S = 5.0
#: Connecting to a peer and reading its ``info`` must end within this long (``Mesh.connect``).
INFO_TIMEOUT_S = 10.0
#: ... and within this long for the dashboard's health poll, which runs every few seconds: a poll that
#: takes longer marks the peer unreachable (the link heartbeat catches silence sooner).
POLL_TIMEOUT_S = 5.0
#: Loading blocks from disk (and compiling them for the default size) must end within this long.
LOAD_TIMEOUT_S = 3600.0
#: A connection closed by the daemon before its handshake ends (refused or evicted at admission while
#: half-open connections flood it) is retried for up to this long, with backoff from
#: CONNECT_RETRY_FIRST_S doubling up to CONNECT_RETRY_MAX_S.
CONNECT_RETRY_S = 8.0
CONNECT_RETRY_FIRST_S = 0.05
CONNECT_RETRY_MAX_S = 1.0
#: Most chunk frames one request may announce (its ``chunks`` field; a tensor has at most the codec's
#: MAX_CHUNKS). A chunk beyond the announced count, or for a request never sent, closes the connection.
MAX_STREAM_CHUNKS = 4096

# --- jobs --------------------------------------------------------------------------------------
#: Generations a head runs at once (steps interleave on the GPU queue); more wait in line.
MAX_ACTIVE_GENERATIONS = 4
#: ... of which one source (a client's IPv4 address or IPv6 /64) runs at most this many: a slot is
#: always left for someone else, even while one client floods the queue or stops reading its socket.
MAX_ACTIVE_GENERATIONS_PER_SOURCE = 3
#: Generations that may wait in line at a head; beyond that new ones are refused as busy.
MAX_QUEUED_GENERATIONS = 32
#: Prompts one ``encode-prompt`` request may carry (a prompt and CFG's empty one need two).
MAX_PROMPTS_PER_ENCODE = 4
#: A peer asked to encode prompts must answer within this long (loading a text encoder from disk
#: the first time included).
ENCODE_PROMPT_TIMEOUT_S = 600.0
#: A ``prepare`` may compile the stages' blocks for a new image size first (``compiling`` events
#: flow meanwhile; a dead peer is still noticed within PEER_SILENCE_TIMEOUT_S).
PREPARE_TIMEOUT_S = 900.0
#: Prepared jobs a stage holds at once.
MAX_JOBS_PER_STAGE = 64
#: Longest job id a head may give a stage's job (a head makes 32 hex characters).
MAX_JOB_ID_LENGTH = 64
#: A job's geometry, as a stage checks it before allocating for it: images per batch, ...
MAX_BATCH = 8
#: ... text tokens (a prompt's embedding; presets use at most 512), ...
MAX_TEXT_TOKENS = 4096
#: ... and latent grid side in tokens (MAX_IMAGE_SIDE over a size multiple of 8).
MAX_GRID = 512
#: Most stages one split plan may have.
MAX_PLAN_STAGES = 64
#: Largest image side, in pixels.
MAX_IMAGE_SIDE = 4096
#: Most denoising steps.
MAX_STEPS = 200
#: Longest prompt, in bytes.
MAX_PROMPT_BYTES = 16 * 1024
#: Bytes sent by the link bandwidth probe.
BANDWIDTH_PROBE_BYTES = 8 << 20
#: A link's measured bandwidth is re-measured after this long.
BANDWIDTH_MAX_AGE_S = 300.0
#: Channels a daemon keeps open to other daemons; beyond that the least recently used idle one is
#: closed (a plan names its peers, so a key holder could otherwise have a daemon hold a channel per
#: address).
MAX_POOLED_PEERS = 32

# --- same-host shared memory (meshd.wire.shm) ---------------------------------------------------
#: Largest shared region one inbound connection may have (whole staging pages; at most two streams).
MAX_SHM_REGION_BYTES = 1 << 30
#: Most bytes of shared regions one daemon holds for all its inbound connections together.
MAX_SHM_TOTAL_BYTES = 4 << 30
#: Offers made but not yet claimed, at once (each holds a region until claimed or expired).
MAX_SHM_OFFERS = 16
#: Length of an offer's random token, and how long it may be claimed (a claim follows in milliseconds).
SHM_TOKEN_BYTES = 32
SHM_TOKEN_TTL_S = 5.0
#: One conversation on the Unix socket (token in, descriptor out) must be over within this long.
SHM_SOCKET_TIMEOUT_S = 2.0
#: The whole setup (offer over TCP, claim over the Unix socket) gets this long before TCP is used.
SHM_SETUP_TIMEOUT_S = 10.0
#: A sender whose setup failed asks again after this long, doubling after each failure in a row up to
#: the second figure (TCP meanwhile).
SHM_RETRY_S = 30.0
SHM_RETRY_MAX_S = 600.0
#: A shared activation starts at a multiple of this many bytes (senders use whole staging pages).
SHM_ALIGN = 64
#: A forward sent ahead of its stream (``shm`` ``ring``) waits at most this long for its doorbell: the
#: sender's blocks may take that long on a slow card; a sender that gives up cancels it sooner.
SHM_READY_TIMEOUT_S = 600.0
#: How often a region's doorbell thread looks whether the region was dropped meanwhile.
SHM_DOORBELL_POLL_S = 1.0
