/* fileio.c - whole-file reads and atomic writes for the format modules (safetensors, npy,
 * config).
 * Invariants: qf_io_read_file returns either QF_OK with a buffer of exactly the file's bytes plus
 * a NUL, or an error with nothing allocated. qf_io_write_atomic never leaves a partial file at
 * `path`: it writes a sibling temporary, makes it durable (fsync), then rename()s it, which POSIX
 * makes atomic within one directory; any failure unlinks the temporary. */
#include "io_internal.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

qf_status qf_io_read_file(const char *path, size_t max_len, const char *what, unsigned char **buf,
                          size_t *len) {
    if (!path || !buf || !len) return qf_fail(QF_ERR_ARG, "%s: NULL path or output", what);
    *buf = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qf_fail(QF_ERR_IO, "%s: cannot open %s: %s", what, path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return qf_fail(QF_ERR_IO, "%s: cannot stat %s: %s", what, path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return qf_fail(QF_ERR_IO, "%s: %s is not a regular file", what, path);
    }
    if ((uint64_t)st.st_size > (uint64_t)max_len) {
        close(fd);
        return qf_fail(QF_ERR_FORMAT, "%s: %s is %lld bytes, more than the %zu-byte limit", what, path,
                       (long long)st.st_size, max_len);
    }
    size_t n = (size_t)st.st_size;
    unsigned char *b = malloc(n + 1);
    if (!b) {
        close(fd);
        return qf_fail(QF_ERR_NOMEM, "%s: no memory to read %s (%zu bytes)", what, path, n);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, b + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            free(b);
            close(fd);
            return qf_fail(QF_ERR_IO, "%s: cannot read %s: %s", what, path, strerror(e));
        }
        if (r == 0) break; /* the file shrank while we read it: use what is there */
        got += (size_t)r;
    }
    close(fd);
    b[got] = '\0';
    *buf = b;
    *len = got;
    return QF_OK;
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        if (w == 0) { errno = EIO; return -1; }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fsync the directory holding path, so the rename itself survives a crash. */
static int fsync_parent(const char *path) {
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (!slash) strcpy(dir, ".");
    else if (slash == path) strcpy(dir, "/");
    else {
        size_t n = (size_t)(slash - path);
        if (n >= sizeof dir) { errno = ENAMETOOLONG; return -1; }
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int r = fsync(fd);
    /* some file systems refuse fsync on directories; the rename has happened either way */
    if (r != 0 && (errno == EINVAL || errno == EBADF)) r = 0;
    int e = errno;
    close(fd);
    errno = e;
    return r;
}

qf_status qf_io_write_atomic(const char *path, const qf_io_chunk *chunks, int n, const char *what) {
    if (!path || !*path) return qf_fail(QF_ERR_ARG, "%s: path is NULL or empty", what);
    if (n < 0 || (n > 0 && !chunks)) return qf_fail(QF_ERR_ARG, "%s: bad chunk list", what);
    size_t plen = strlen(path);
    char *tmp = malloc(plen + sizeof ".tmp.XXXXXX");
    if (!tmp) return qf_fail(QF_ERR_NOMEM, "%s: no memory for the temporary name of %s", what, path);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp.XXXXXX", sizeof ".tmp.XXXXXX");
    int fd = mkstemp(tmp);
    if (fd < 0) {
        int e = errno;
        qf_status s = qf_fail(QF_ERR_IO, "%s: cannot create a temporary file next to %s: %s", what, path, strerror(e));
        free(tmp);
        return s;
    }
    const char *step = "write";
    int ok = 1;
    for (int i = 0; i < n && ok; i++)
        if (chunks[i].len && write_all(fd, chunks[i].data, chunks[i].len) != 0) ok = 0;
    /* mkstemp makes the file 0600; a saved model is as readable as any file the user writes */
    if (ok) { step = "chmod"; ok = fchmod(fd, 0644) == 0; }
    if (ok) { step = "fsync"; ok = fsync(fd) == 0; }
    int e = errno;
    if (close(fd) != 0 && ok) { e = errno; step = "close"; ok = 0; }
    if (ok) { step = "rename"; ok = rename(tmp, path) == 0; e = errno; }
    if (!ok) {
        unlink(tmp);
        qf_status s = qf_fail(QF_ERR_IO, "%s: cannot write %s (%s of %s failed): %s", what, path, step, tmp, strerror(e));
        free(tmp);
        return s;
    }
    free(tmp);
    if (fsync_parent(path) != 0)
        return qf_fail(QF_ERR_IO, "%s: wrote %s but cannot fsync its directory: %s", what, path, strerror(errno));
    return QF_OK;
}
