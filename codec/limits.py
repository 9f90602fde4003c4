"""Every size limit the codec enforces, in one place.

Decoding checks a header against these before allocating anything, so a hostile or corrupt header
can at worst produce a CodecError.
"""

#: Header format version written by this library; decoders refuse any other.
FORMAT_VERSION = 1

#: Largest tensor (elements) a header may declare: 2^31, i.e. 4 GiB of bf16.
MAX_ELEMENTS = 1 << 31

#: Most dimensions a tensor may have.
MAX_NDIM = 8

#: Largest single dimension.
MAX_DIM = 1 << 28

#: Most chunks one tensor may be split into.
MAX_CHUNKS = 4096

#: Largest channel count (last dimension) the quantising codecs accept.
MAX_CHANNELS = 1 << 16

#: Most video frames one chunk may carry.
MAX_FRAMES_PER_CHUNK = 1024

#: Largest video frame side. HEVC allows 8192; NVENC/NVDEC on every generation since Pascal do too,
#: but 4096 keeps each frame small enough to spread over several engines.
MAX_FRAME_SIDE = 4096

#: Smallest video frame side: NVDEC's HEVC minimum on current GPUs is 144x144.
MIN_FRAME_SIDE = 144

#: Frame sides are multiples of this (HEVC's minimum coding-block size; NVENC needs even sizes).
FRAME_ALIGN = 16

#: Plane area (samples) a frame aims for; larger frames amortise per-frame cost, smaller ones
#: spread over more decoder sessions.
TARGET_PLANE_AREA = 1 << 19

#: A compressed frame may not exceed its raw size by more than this factor plus a fixed slack
#: (HEVC lossless on noise can expand slightly).
MAX_FRAME_EXPANSION = 2.0
FRAME_SLACK_BYTES = 1 << 16

#: Default tokens per chunk: enough work per chunk to amortise overheads, small enough that
#: encode, send and decode overlap.
DEFAULT_CHUNK_TOKENS = 1024
