// The structure and rows of a .lora.arrow skill card, read straight from the mapped file in one call.
//
// A card is an Arrow IPC file of one record batch with a fixed set of columns (spec:
// docs/card-format.md). pyarrow reads it through general machinery (footer and schema objects,
// a RecordBatch, an Array per column, a Python object per value), which cost more than the rest
// of loading a small card; this reader knows the card's layout and decodes only that.
//
// It is a fast path, not a second judge: it accepts only a valid card laid out exactly as
// pyarrow writes one, and answers None for anything else (damaged, hostile, or merely unusual),
// so that the caller runs the checked reader (cards/_reader.py), which names the problem. Every
// file accepted here is one that the framing pre-check (cards/_ipc.py), pyarrow's file reader,
// RecordBatch.validate(full=True) and the reader's row checks all accept, with the same content:
//   - the FlatBuffers metadata (footer, message) is checked with the rules of the FlatBuffers
//     verifier Arrow runs (bounds, alignment, vtables, offsets, strings with their terminator,
//     depth and table count) on every table and field, and anything optional a card does not
//     use (dictionaries, compression, custom metadata of the footer, message or fields,
//     schema features) declines;
//   - the framing as cards/_ipc.py checks it (magic, footer length, one record batch, every body
//     buffer inside the body) plus Arrow's rules (8-byte aligned blocks and buffers, metadata
//     version, body length, block inside the file, canonical message prefix);
//   - the schema is exactly the v1 or v2 card schema (names, types, nullable, list child
//     "item"), little-endian; metadata keys are distinct;
//   - every column's length equals the batch's and has no nulls, every buffer is large enough,
//     offsets are non-negative, non-decreasing and inside their values, names are UTF-8;
//   - every row passes _rows_by_row's checks (name 1..max bytes and distinct, dtypes of the
//     version, 2 dims in 1..max, byte sizes, rank and alpha, shapes against the rank).
// Every offset and length is checked against the bytes present before it is read; Python
// objects are made only once every check has passed.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace aios {
namespace {

// Any check failing: the file is not a plain card layout (the caller takes the full reader).
struct Decline {};

inline void need(bool ok) {
    if (!ok) throw Decline{};
}

template <typename T>
inline T load(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));  // little-endian host (checked at the entry point)
    return v;
}

// FlatBuffers reads with the rules of flatbuffers::Verifier as Arrow constructs it
// (max depth 128, max tables 8 x buffer size, alignment checked); positions are offsets into
// the buffer, so nothing outside it is ever addressed.
class Flat {
public:
    Flat(const uint8_t* data, size_t size) : d_(data), n_(size), max_tables_(8 * uint64_t{size}) {
        // FLATBUFFERS_MIN_BUFFER_SIZE, and the verifier's size limit
        need(n_ >= 12 && n_ < size_t{std::numeric_limits<int32_t>::max()});
    }

    // Verifier::Verify(elem, len)
    bool in_range(size_t elem, size_t len) const { return len < n_ && elem <= n_ - len; }
    template <typename T>
    void scalar_at(size_t elem) const {
        need((elem & (sizeof(T) - 1)) == 0 && in_range(elem, sizeof(T)));
    }
    template <typename T>
    T read(size_t elem) const {
        return load<T>(d_ + elem);
    }

    // Verifier::VerifyOffset: the uoffset at ``start``; returns the position it points to.
    size_t offset_at(size_t start) const {
        scalar_at<uint32_t>(start);
        const uint32_t o = read<uint32_t>(start);
        need(o != 0 && static_cast<int32_t>(o) >= 0 && in_range(start + o, 1));
        return start + o;
    }
    size_t root() const { return offset_at(0); }

    // Verifier::VerifyTableStart; returns the vtable position. Pair with end_table().
    size_t table_start(size_t table) {
        scalar_at<int32_t>(table);
        const size_t vt = table - static_cast<size_t>(static_cast<int64_t>(read<int32_t>(table)));
        ++depth_;
        ++tables_;
        need(depth_ <= 128 && tables_ <= max_tables_);
        scalar_at<uint16_t>(vt);
        const uint16_t vsize = read<uint16_t>(vt);
        need((vsize & 1) == 0 && in_range(vt, vsize));
        return vt;
    }
    void end_table() { --depth_; }

    // Table::GetOptionalFieldOffset for field number ``index`` (0 = absent)
    uint16_t field_offset(size_t vt, int index) const {
        const size_t slot = 4 + 2 * static_cast<size_t>(index);
        return slot < read<uint16_t>(vt) ? read<uint16_t>(vt + slot) : 0;
    }
    // A scalar field (Table::VerifyField) or its default.
    template <typename T>
    T scalar(size_t table, size_t vt, int index, T dflt) const {
        const uint16_t fo = field_offset(vt, index);
        if (!fo) return dflt;
        scalar_at<T>(table + fo);
        return read<T>(table + fo);
    }
    // An offset field (Table::VerifyOffset): the position it points to, or 0 when absent.
    size_t ref(size_t table, size_t vt, int index) const {
        const uint16_t fo = field_offset(vt, index);
        return fo ? offset_at(table + fo) : 0;
    }
    // Verifier::VerifyVectorOrString: the element count of the vector at ``pos``.
    uint32_t vector(size_t pos, size_t elem_size) const {
        scalar_at<uint32_t>(pos);
        const uint32_t count = read<uint32_t>(pos);
        need(count < std::numeric_limits<int32_t>::max() / elem_size);
        need(in_range(pos, 4 + elem_size * count));
        return count;
    }
    // Position of table ``i`` of a vector of tables at ``pos`` (verified by table_start).
    size_t vector_table(size_t pos, uint32_t i) const {
        const size_t elem = pos + 4 + 4 * size_t{i};
        return elem + read<uint32_t>(elem);
    }
    // Verifier::VerifyString: a string field's bytes, or nullptr when absent.
    const char* string(size_t table, size_t vt, int index, size_t* len) const {
        const size_t pos = ref(table, vt, index);
        if (!pos) return nullptr;
        const uint32_t count = vector(pos, 1);
        const size_t end = pos + 4 + count;
        need(in_range(end, 1) && d_[end] == 0);
        *len = count;
        return reinterpret_cast<const char*>(d_ + pos + 4);
    }

    const uint8_t* data() const { return d_; }

private:
    const uint8_t* d_;
    size_t n_;
    uint64_t max_tables_;
    uint64_t depth_ = 0;
    uint64_t tables_ = 0;
};

// Arrow's Schema.fbs type tags and the card's column kinds.
enum Kind { kUtf8, kBinary, kListInt32, kInt32, kFloat64 };
constexpr uint8_t kTypeInt = 2, kTypeFloatingPoint = 3, kTypeBinary = 4, kTypeUtf8 = 5, kTypeList = 12;

struct Column {
    const char* name;
    Kind kind;
};
// v2 = these 10 in this order; v1 = the first 6 (spec.V1_COLUMNS / V2_COLUMNS)
constexpr Column kColumns[] = {
    {"module", kUtf8},      {"weight_a", kBinary},   {"weight_b", kBinary}, {"shape_a", kListInt32},
    {"shape_b", kListInt32}, {"dtype", kUtf8},        {"dtype_a", kUtf8},    {"dtype_b", kUtf8},
    {"rank", kInt32},       {"alpha", kFloat64},
};
constexpr int kV1Columns = 6, kV2Columns = 10;

bool name_is(const char* s, size_t len, const char* want) {
    return s != nullptr && len == std::strlen(want) && std::memcmp(s, want, len) == 0;
}

// A Field table that is exactly ``name`` of ``kind`` (nullable, no dictionary, no metadata).
void check_field(Flat& f, size_t field, const char* name, Kind kind, int depth = 0) {
    const size_t vt = f.table_start(field);
    size_t len = 0;
    const char* s = f.string(field, vt, 0, &len);
    need(name_is(s, len, name));
    need(f.scalar<uint8_t>(field, vt, 1, 0) == 1);  // nullable (pa.field's default)
    const uint8_t type_type = f.scalar<uint8_t>(field, vt, 2, 0);
    const size_t type = f.ref(field, vt, 3);
    need(type != 0);
    need(f.field_offset(vt, 4) == 0 && f.field_offset(vt, 6) == 0);  // dictionary, custom_metadata
    const size_t children = f.ref(field, vt, 5);
    const uint32_t nchildren = children ? f.vector(children, 4) : 0;
    const size_t tvt = f.table_start(type);
    switch (kind) {
        case kUtf8: need(type_type == kTypeUtf8); break;
        case kBinary: need(type_type == kTypeBinary); break;
        case kListInt32: need(type_type == kTypeList); break;
        case kInt32:
            need(type_type == kTypeInt && f.scalar<int32_t>(type, tvt, 0, 0) == 32 &&
                 f.scalar<uint8_t>(type, tvt, 1, 0) == 1);
            break;
        case kFloat64: need(type_type == kTypeFloatingPoint && f.scalar<int16_t>(type, tvt, 0, 0) == 2); break;
    }
    f.end_table();
    if (kind == kListInt32) {
        need(depth == 0 && nchildren == 1);
        check_field(f, f.vector_table(children, 0), "item", kInt32, depth + 1);
    } else {
        need(nchildren == 0);
    }
    f.end_table();
}

// One buffer of the batch body: its position in the file and its length.
struct Buf {
    size_t pos;
    size_t len;
};

// Limits a card's rows must keep (spec.LIMITS, passed in by the caller).
struct Limits {
    int64_t rows, name_bytes, dim, rank;
};

// The batch body, column by column, every bound checked before a byte is read.
class Body {
public:
    Body(const uint8_t* file, const uint8_t* nodes, const Buf* bufs, int64_t rows)
        : file_(file), nodes_(nodes), bufs_(bufs), rows_(rows) {}

    // A string or binary column: its values and n + 1 offsets into them.
    struct Var {
        const uint8_t* data;
        std::vector<int32_t> offs;
        size_t size(int64_t i) const { return static_cast<size_t>(offs[i + 1] - offs[i]); }
        const char* at(int64_t i) const { return reinterpret_cast<const char*>(data + offs[i]); }
    };
    Var var() {
        node(true);
        next();  // validity: not read when there are no nulls (as Arrow)
        const Buf off = next(), data = next();
        need(data.len > 0);
        Var v{file_ + data.pos, offsets(off, rows_, static_cast<int64_t>(data.len))};
        start = data.pos;
        return v;
    }
    // A list<int32> column whose every row holds two values: (rows x 2) dims.
    std::vector<int32_t> pairs() {
        node(true);
        next();
        const Buf off = next();
        const int64_t values = node(false);
        next();
        const Buf vals = next();
        need(static_cast<uint64_t>(values) <= vals.len / 4);
        const std::vector<int32_t> o = offsets(off, rows_, values);
        std::vector<int32_t> dims(2 * static_cast<size_t>(rows_));
        for (int64_t i = 0; i < rows_; ++i) {
            need(o[i + 1] - o[i] == 2);  // otherwise the checked reader names the row
            std::memcpy(&dims[2 * i], file_ + vals.pos + 4 * static_cast<size_t>(o[i]), 8);
        }
        return dims;
    }
    template <typename T>
    std::vector<T> fixed() {
        node(true);
        next();
        const Buf vals = next();
        need(vals.len >= sizeof(T) * static_cast<size_t>(rows_));
        std::vector<T> out(static_cast<size_t>(rows_));
        std::memcpy(out.data(), file_ + vals.pos, sizeof(T) * out.size());
        return out;
    }

    size_t start = 0;  // where the last var() column's values begin in the file

private:
    // The next node: its length; nulls are left to the checked reader.
    int64_t node(bool top) {
        const int64_t length = load<int64_t>(nodes_ + 16 * node_);
        const int64_t nulls = load<int64_t>(nodes_ + 16 * node_ + 8);
        ++node_;
        need(nulls == 0 && length >= 0 && (!top || length == rows_));
        return length;
    }
    const Buf& next() { return bufs_[buf_++]; }
    // n + 1 int32 offsets from ``b``: non-negative, non-decreasing, last <= limit.
    std::vector<int32_t> offsets(const Buf& b, int64_t n, int64_t limit) const {
        need(b.len / 4 >= static_cast<size_t>(n + 1));
        std::vector<int32_t> o(static_cast<size_t>(n + 1));
        std::memcpy(o.data(), file_ + b.pos, 4 * o.size());
        need(o[0] >= 0 && o[n] <= limit);
        for (int64_t i = 0; i < n; ++i) need(o[i] <= o[i + 1]);
        return o;
    }

    const uint8_t* file_;
    const uint8_t* nodes_;
    const Buf* bufs_;
    int64_t rows_;
    size_t node_ = 0, buf_ = 0;
};

// The dtype names a card may use and their item sizes (spec.ITEMSIZE; v1: spec.V1_ITEMSIZE).
struct Dtype {
    const char* name;
    int itemsize;
    bool v1, v2;
};
constexpr Dtype kDtypes[] = {{"float32", 4, true, true}, {"float16", 2, true, true},
                             {"bfloat16", 2, false, true}, {"float64", 8, true, false}};
constexpr int kNumDtypes = 4;

// Index into kDtypes of row i's dtype, declining names the version does not allow.
int dtype_of(const Body::Var& col, int64_t i, bool v2) {
    for (int k = 0; k < kNumDtypes; ++k)
        if ((v2 ? kDtypes[k].v2 : kDtypes[k].v1) && name_is(col.at(i), col.size(i), kDtypes[k].name)) return k;
    throw Decline{};
}

// True when ``bytes`` is exactly dims[0] x dims[1] items of ``itemsize`` bytes (dims >= 1, so
// the product is < 2^62 and is multiplied by the item size only when that cannot wrap).
bool holds(size_t bytes, const int32_t* dims, int itemsize) {
    const uint64_t elems = static_cast<uint64_t>(dims[0]) * static_cast<uint64_t>(dims[1]);
    return elems <= bytes / itemsize && elems * itemsize == bytes;
}

PyObject* steal_or_throw(PyObject* o) {
    if (o == nullptr) throw py::error_already_set();
    return o;
}

// A list of n Python objects made by ``make(i)`` (new references).
template <typename F>
py::list list_of(int64_t n, F make) {
    py::list out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) PyList_SET_ITEM(out.ptr(), i, steal_or_throw(make(i)));
    return out;
}

// The dtype names of one tensor column, one shared str object per distinct name.
py::list dtype_names(const std::vector<int>& kinds) {
    py::object names[kNumDtypes];
    for (int k : kinds)
        if (!names[k]) names[k] = py::str(kDtypes[k].name);
    return list_of(static_cast<int64_t>(kinds.size()), [&](int64_t i) { return names[kinds[i]].inc_ref().ptr(); });
}

// A card's rows: the checks of cards/_reader.py's row pass, all of them (the caller sees only
// rows every check accepted; any failure declines, and the checked reader names the row).
py::tuple card_rows(Body& cols, bool v2, int64_t rows, const Limits& lim) {
    const Body::Var module = cols.var();
    const Body::Var weight_a = cols.var();
    const size_t start_a = cols.start;
    const Body::Var weight_b = cols.var();
    const size_t start_b = cols.start;
    const std::vector<int32_t> shape_a = cols.pairs(), shape_b = cols.pairs();
    const Body::Var dtype = cols.var();
    Body::Var dtype_a = dtype, dtype_b = dtype;
    std::vector<int32_t> rank;
    std::vector<double> alpha;
    if (v2) {
        dtype_a = cols.var();
        dtype_b = cols.var();
        rank = cols.fixed<int32_t>();
        alpha = cols.fixed<double>();
    }
    std::vector<int> kind_a(static_cast<size_t>(rows)), kind_b(static_cast<size_t>(rows));
    std::unordered_set<std::string_view> seen;
    seen.reserve(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) {
        const size_t name_len = module.size(i);
        need(name_len >= 1 && name_len <= static_cast<size_t>(lim.name_bytes));
        need(seen.emplace(module.at(i), name_len).second);  // distinct
        kind_a[i] = dtype_of(dtype_a, i, v2);
        kind_b[i] = dtype_of(dtype_b, i, v2);
        if (v2) need(dtype.size(i) == dtype_a.size(i) && std::memcmp(dtype.at(i), dtype_a.at(i), dtype.size(i)) == 0);
        const int32_t* a = &shape_a[2 * i];
        const int32_t* b = &shape_b[2 * i];
        for (int32_t d : {a[0], a[1], b[0], b[1]}) need(d >= 1 && d <= lim.dim);
        need(holds(weight_a.size(i), a, kDtypes[kind_a[i]].itemsize) &&
             holds(weight_b.size(i), b, kDtypes[kind_b[i]].itemsize));
        const int32_t r = v2 ? rank[i] : a[0];
        if (v2) need(r >= 1 && r <= lim.rank && std::isfinite(alpha[i]) && alpha[i] > 0);
        need(a[0] == r && b[1] == r);
    }
    // Everything checked: the Python objects.
    py::list modules = list_of(rows, [&](int64_t i) {
        PyObject* s = PyUnicode_DecodeUTF8(module.at(i), static_cast<Py_ssize_t>(module.size(i)), "strict");
        if (s == nullptr && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();  // not UTF-8: pyarrow's full validation refuses it too
            throw Decline{};
        }
        return s;
    });
    auto shapes = [&](const std::vector<int32_t>& dims) {
        return list_of(rows, [&](int64_t i) {
            PyObject* row = steal_or_throw(PyList_New(2));
            PyList_SET_ITEM(row, 0, PyLong_FromLong(dims[2 * i]));
            PyList_SET_ITEM(row, 1, PyLong_FromLong(dims[2 * i + 1]));
            return row;
        });
    };
    auto offsets = [&](const Body::Var& col) {
        return list_of(rows + 1, [&](int64_t i) { return PyLong_FromLong(col.offs[i]); });
    };
    py::list names_a = dtype_names(kind_a);
    py::object names_b = v2 ? py::object(dtype_names(kind_b)) : py::object(names_a);
    py::list ranks = list_of(rows, [&](int64_t i) { return PyLong_FromLong(v2 ? rank[i] : shape_a[2 * i]); });
    py::object alphas = py::none();
    if (v2) alphas = list_of(rows, [&](int64_t i) { return PyFloat_FromDouble(alpha[i]); });
    return py::make_tuple(modules, names_a, names_b, shapes(shape_a), shapes(shape_b), start_a, offsets(weight_a),
                          start_b, offsets(weight_b), ranks, alphas);
}

constexpr char kMagic[] = "ARROW1";
constexpr int16_t kMetadataV4 = 3, kMetadataV5 = 4;  // Arrow reads V4 and V5
constexpr uint8_t kHeaderRecordBatch = 3;

py::object layout(const uint8_t* d, size_t size, const Limits& lim) {
    // Framing (cards/_ipc.py): magic at both ends, footer length inside the file.
    need(size >= 32 && std::memcmp(d, kMagic, 6) == 0 && std::memcmp(d + size - 6, kMagic, 6) == 0);
    const size_t footer_end = size - 10;
    const int32_t footer_len = load<int32_t>(d + footer_end);
    need(footer_len > 0 && static_cast<size_t>(footer_len) <= footer_end - 8);
    const size_t footer_start = footer_end - static_cast<size_t>(footer_len);

    // Footer: schema, no dictionaries, exactly one record batch, no footer metadata.
    Flat f(d + footer_start, static_cast<size_t>(footer_len));
    const size_t root = f.root();
    const size_t rvt = f.table_start(root);
    f.scalar<int16_t>(root, rvt, 0, 0);  // version (verified, not used, as Arrow)
    const size_t schema = f.ref(root, rvt, 1);
    const size_t dicts = f.ref(root, rvt, 2);
    need(schema != 0 && (!dicts || f.vector(dicts, 24) == 0));
    const size_t batches = f.ref(root, rvt, 3);
    need(batches != 0 && f.vector(batches, 24) == 1 && f.field_offset(rvt, 4) == 0);
    const uint8_t* block = f.data() + batches + 4;
    const int64_t offset = load<int64_t>(block);
    const int32_t meta_len = load<int32_t>(block + 8);
    const int64_t body_len = load<int64_t>(block + 16);

    // Schema: little-endian, exactly the v1 or v2 columns; its key-value metadata.
    const size_t svt = f.table_start(schema);
    need(f.scalar<int16_t>(schema, svt, 0, 0) == 0 && f.field_offset(svt, 3) == 0);  // endianness, features
    const size_t fields = f.ref(schema, svt, 1);
    need(fields != 0);
    const uint32_t ncols = f.vector(fields, 4);
    need(ncols == kV1Columns || ncols == kV2Columns);
    for (uint32_t i = 0; i < ncols; ++i) check_field(f, f.vector_table(fields, i), kColumns[i].name, kColumns[i].kind);
    py::dict metadata;
    const size_t kvs = f.ref(schema, svt, 2);
    const uint32_t nkv = kvs ? f.vector(kvs, 4) : 0;
    for (uint32_t i = 0; i < nkv; ++i) {
        const size_t kv = f.vector_table(kvs, i);
        const size_t kvt = f.table_start(kv);
        size_t klen = 0, vlen = 0;
        const char* k = f.string(kv, kvt, 0, &klen);
        const char* v = f.string(kv, kvt, 1, &vlen);
        need(k != nullptr && v != nullptr);
        f.end_table();
        metadata[py::bytes(k, klen)] = py::bytes(v, vlen);
    }
    need(py::len(metadata) == nkv);  // duplicate keys: leave them to pyarrow's reading
    f.end_table();
    f.end_table();

    // The record batch block: aligned, inside the file before the footer, canonical prefix
    // (continuation marker, then the flatbuffer's length filling the block's metadata).
    need(offset >= 8 && meta_len >= 8 && body_len >= 0 && offset % 8 == 0 && meta_len % 8 == 0 &&
         body_len % 8 == 0);
    need(static_cast<uint64_t>(offset) <= footer_start &&
         static_cast<uint64_t>(meta_len) <= footer_start - static_cast<uint64_t>(offset) &&
         static_cast<uint64_t>(body_len) <= footer_start - static_cast<uint64_t>(offset) - meta_len);
    need(load<uint32_t>(d + offset) == 0xFFFFFFFFu && load<int32_t>(d + offset + 4) == meta_len - 8);

    // Message: version, a RecordBatch header, body length as the block says, no metadata.
    Flat m(d + offset + 8, static_cast<size_t>(meta_len - 8));
    const size_t mroot = m.root();
    const size_t mvt = m.table_start(mroot);
    const int16_t version = m.scalar<int16_t>(mroot, mvt, 0, 0);
    need(version >= kMetadataV4 && version <= kMetadataV5);
    need(m.scalar<uint8_t>(mroot, mvt, 1, 0) == kHeaderRecordBatch);
    need(m.scalar<int64_t>(mroot, mvt, 3, 0) == body_len && m.field_offset(mvt, 4) == 0);
    const size_t rb = m.ref(mroot, mvt, 2);
    need(rb != 0);
    const size_t bvt = m.table_start(rb);
    const int64_t rows = m.scalar<int64_t>(rb, bvt, 0, 0);
    need(rows >= 1 && rows <= lim.rows);
    need(m.field_offset(bvt, 3) == 0 && m.field_offset(bvt, 4) == 0);  // compression, variadic counts
    const size_t nodes = m.ref(rb, bvt, 1);
    const size_t buffers = m.ref(rb, bvt, 2);
    need(nodes != 0 && buffers != 0);
    const bool v2 = ncols == kV2Columns;
    const uint32_t want_nodes = v2 ? 12 : 8, want_buffers = v2 ? 30 : 20;
    need(m.vector(nodes, 16) == want_nodes && m.vector(buffers, 16) == want_buffers);
    m.end_table();
    m.end_table();

    // Every buffer inside the body (all of them, as cards/_ipc.py); those read start 8-aligned.
    const size_t body = static_cast<size_t>(offset) + static_cast<size_t>(meta_len);
    Buf bufs[30];
    for (uint32_t i = 0; i < want_buffers; ++i) {
        const int64_t b_off = load<int64_t>(m.data() + buffers + 4 + 16 * i);
        const int64_t b_len = load<int64_t>(m.data() + buffers + 12 + 16 * i);
        need(b_off >= 0 && b_len >= 0 && b_off <= body_len && b_len <= body_len - b_off);
        need(b_len == 0 || b_off % 8 == 0);
        bufs[i] = {body + static_cast<size_t>(b_off), static_cast<size_t>(b_len)};
    }
    Body cols(d, m.data() + nodes + 4, bufs, rows);
    py::tuple r = card_rows(cols, v2, rows, lim);
    return py::make_tuple(v2 ? 2 : 1, metadata, r);
}

py::object card_layout(py::buffer file, int64_t max_rows, int64_t max_name_bytes, int64_t max_dim, int64_t max_rank) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return py::none();  // the format is little-endian; the checked reader handles this host
#endif
    Py_buffer view;
    if (PyObject_GetBuffer(file.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    const Limits lim{max_rows, max_name_bytes, max_dim, max_rank};
    try {
        py::object out = layout(static_cast<const uint8_t*>(view.buf), static_cast<size_t>(view.len), lim);
        PyBuffer_Release(&view);
        return out;
    } catch (const Decline&) {
        PyBuffer_Release(&view);
        return py::none();
    } catch (...) {
        PyBuffer_Release(&view);
        throw;
    }
}

}  // namespace

void register_card_layout(py::module_& m) {
    m.def("card_layout", &card_layout, py::arg("file"), py::arg("max_rows"), py::arg("max_name_bytes"),
          py::arg("max_dim"), py::arg("max_rank"),
          "(version, metadata, rows) of a .lora.arrow card read from its bytes, with every row "
          "checked; None when the file is not exactly a plain, valid card (the caller then runs "
          "the checked reader, which names the problem).");
}

}  // namespace aios
