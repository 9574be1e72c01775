"""Jiangxi's county-level divisions (区, 县, 县级市) as migration 15 fills the `districts` table.

Source: GB/T 2260 codes as the Ministry of Civil Affairs publishes them (中华人民共和国县以上行政区划代码,
民政部), as of its 2023 list: 100 divisions in the eleven prefecture-level cities — 27 districts, 12
county-level cities, 61 counties.  Changes of the last decade included: 南昌 湾里区 (360105) merged into
新建区 and 红谷滩区 (360113) created (2019); 新建县 → 新建区 (360112, 2015); 九江 庐山区 renamed 濂溪区
(360402, 2016), 星子县 → 庐山市 (360483, 2016), 九江县 → 柴桑区 (360404, 2017); 余江县 → 余江区 (360603,
2018); 南康市 → 南康区 (360703, 2013), 赣县 → 赣县区 (360704, 2016), 龙南县 → 龙南市 (360783, 2020);
东乡县 → 东乡区 (361003, 2017); 广丰县 → 广丰区 (361103, 2015), 上饶县 → 广信区 (361104, 2019).
English names: the pinyin of the name and its kind (District, County, City)."""

from __future__ import annotations

# (code, name_zh, name_en); the city is the code's first four digits followed by 00.
DISTRICTS: tuple[tuple[int, str, str], ...] = (
    (360102, "东湖区", "Donghu District"), (360103, "西湖区", "Xihu District"), (360104, "青云谱区", "Qingyunpu District"),
    (360111, "青山湖区", "Qingshanhu District"), (360112, "新建区", "Xinjian District"),
    (360113, "红谷滩区", "Honggutan District"), (360121, "南昌县", "Nanchang County"), (360123, "安义县", "Anyi County"),
    (360124, "进贤县", "Jinxian County"),
    (360202, "昌江区", "Changjiang District"), (360203, "珠山区", "Zhushan District"), (360222, "浮梁县", "Fuliang County"),
    (360281, "乐平市", "Leping City"),
    (360302, "安源区", "Anyuan District"), (360313, "湘东区", "Xiangdong District"), (360321, "莲花县", "Lianhua County"),
    (360322, "上栗县", "Shangli County"), (360323, "芦溪县", "Luxi County"),
    (360402, "濂溪区", "Lianxi District"), (360403, "浔阳区", "Xunyang District"), (360404, "柴桑区", "Chaisang District"),
    (360423, "武宁县", "Wuning County"), (360424, "修水县", "Xiushui County"), (360425, "永修县", "Yongxiu County"),
    (360426, "德安县", "De'an County"), (360428, "都昌县", "Duchang County"), (360429, "湖口县", "Hukou County"),
    (360430, "彭泽县", "Pengze County"), (360481, "瑞昌市", "Ruichang City"), (360482, "共青城市", "Gongqingcheng City"),
    (360483, "庐山市", "Lushan City"),
    (360502, "渝水区", "Yushui District"), (360521, "分宜县", "Fenyi County"),
    (360602, "月湖区", "Yuehu District"), (360603, "余江区", "Yujiang District"), (360681, "贵溪市", "Guixi City"),
    (360702, "章贡区", "Zhanggong District"), (360703, "南康区", "Nankang District"), (360704, "赣县区", "Ganxian District"),
    (360722, "信丰县", "Xinfeng County"), (360723, "大余县", "Dayu County"), (360724, "上犹县", "Shangyou County"),
    (360725, "崇义县", "Chongyi County"), (360726, "安远县", "Anyuan County"), (360728, "定南县", "Dingnan County"),
    (360729, "全南县", "Quannan County"), (360730, "宁都县", "Ningdu County"), (360731, "于都县", "Yudu County"),
    (360732, "兴国县", "Xingguo County"), (360733, "会昌县", "Huichang County"), (360734, "寻乌县", "Xunwu County"),
    (360735, "石城县", "Shicheng County"), (360781, "瑞金市", "Ruijin City"), (360783, "龙南市", "Longnan City"),
    (360802, "吉州区", "Jizhou District"), (360803, "青原区", "Qingyuan District"), (360821, "吉安县", "Ji'an County"),
    (360822, "吉水县", "Jishui County"), (360823, "峡江县", "Xiajiang County"), (360824, "新干县", "Xingan County"),
    (360825, "永丰县", "Yongfeng County"), (360826, "泰和县", "Taihe County"), (360827, "遂川县", "Suichuan County"),
    (360828, "万安县", "Wan'an County"), (360829, "安福县", "Anfu County"), (360830, "永新县", "Yongxin County"),
    (360881, "井冈山市", "Jinggangshan City"),
    (360902, "袁州区", "Yuanzhou District"), (360921, "奉新县", "Fengxin County"), (360922, "万载县", "Wanzai County"),
    (360923, "上高县", "Shanggao County"), (360924, "宜丰县", "Yifeng County"), (360925, "靖安县", "Jing'an County"),
    (360926, "铜鼓县", "Tonggu County"), (360981, "丰城市", "Fengcheng City"), (360982, "樟树市", "Zhangshu City"),
    (360983, "高安市", "Gao'an City"),
    (361002, "临川区", "Linchuan District"), (361003, "东乡区", "Dongxiang District"), (361021, "南城县", "Nancheng County"),
    (361022, "黎川县", "Lichuan County"), (361023, "南丰县", "Nanfeng County"), (361024, "崇仁县", "Chongren County"),
    (361025, "乐安县", "Le'an County"), (361026, "宜黄县", "Yihuang County"), (361027, "金溪县", "Jinxi County"),
    (361028, "资溪县", "Zixi County"), (361030, "广昌县", "Guangchang County"),
    (361102, "信州区", "Xinzhou District"), (361103, "广丰区", "Guangfeng District"), (361104, "广信区", "Guangxin District"),
    (361123, "玉山县", "Yushan County"), (361124, "铅山县", "Yanshan County"), (361125, "横峰县", "Hengfeng County"),
    (361126, "弋阳县", "Yiyang County"), (361127, "余干县", "Yugan County"), (361128, "鄱阳县", "Poyang County"),
    (361129, "万年县", "Wannian County"), (361130, "婺源县", "Wuyuan County"), (361181, "德兴市", "Dexing City"),
)


def district_city(code: int) -> int:
    """The prefecture-level city (division code) a county-level code belongs to: 360102 → 360100."""
    return code // 100 * 100
