"""Writes the .npy reference files test_io.c reads (run with Debian's /usr/bin/python3, numpy 1.24).
The values are repeated in test_io.c; qf_npy_write's output is compared byte for byte with these."""
import numpy as np
from numpy.lib import format as F

a = np.arange(6, dtype='<f4').reshape(2, 3) / 4 - 0.5
np.save('f4_2x3.npy', a)
np.save('f8_3.npy', np.array([1.5, -2.25, 1e300]))
np.save('f2_2x2.npy', np.array([[1, 65504], [-0.5, 6e-8]], dtype='<f2'))
np.save('i8_2.npy', np.array([-(2**62), 7], dtype='<i8'))
np.save('i4_2.npy', np.array([-5, 2**31 - 1], dtype='<i4'))
np.save('i2_2.npy', np.array([-300, 32767], dtype='<i2'))
np.save('i1_3.npy', np.array([-128, 0, 127], dtype='i1'))
np.save('u1_1x4.npy', np.array([[0, 1, 200, 255]], dtype='u1'))
np.save('b1_3.npy', np.array([True, False, True]))
np.save('f4_scalar.npy', np.float32(3.5))
np.save('f4_0x3.npy', np.zeros((0, 3), dtype='<f4'))
for v in [(2, 0), (3, 0)]:
    with open('f4_2x3_v%d.npy' % v[0], 'wb') as f:
        F.write_array(f, a, version=v)
np.save('f4_big_endian.npy', np.arange(3, dtype='>f4'))
np.save('f4_fortran.npy', np.asfortranarray(np.arange(6, dtype='<f4').reshape(2, 3)))
np.save('object.npy', np.array([1, 'a'], dtype=object), allow_pickle=True)
